"""The controller's client: numpy and pyzmq, nothing else.

    client = PolicyClient("tcp://robot:5555")
    result = client.infer({"observation.images.top": frame, "observation.state": q, "prompt": "transfer the cube"})
    result["actions"]  # [chunk, action_dim]

A REQ socket with the ZeroMQ guide's lazy-pirate pattern: when a reply does not come within
`timeout_s`, the socket is closed and reopened and the request sent again (`retries` times), so a
restarted daemon is picked up and a late reply to an abandoned request can never be read as the
answer to a new one. Error replies raise typed exceptions; a reply that says the state was outside the
policy's training range (degrees for radians, a state normalized twice) raises a `StateOutOfRangeWarning`.

A frame over the server's `max_frame_bytes` is not answered: the server drops the connection before
reading it. Once `metadata()` has told the limits, such a request is refused here, before sending
(`RequestTooLargeError`); otherwise the dropped connection is reported as `ConnectionDroppedError`.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import numpy as np
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from pi0_client import protocol
from pi0_client.metadata import Metadata


class PolicyError(Exception):
    """The server refused the request or could not serve it; `code` says which (see docs/protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BusyError(PolicyError):
    """The server's queue is full: retry later."""


class RequestTooLargeError(PolicyError):
    """A frame or the request exceeds the limits the server's metadata states; nothing was sent."""


class StateOutOfRangeWarning(UserWarning):
    """The server served the request, but the state sent lies outside the policy's training range on the
    dimensions `dims` names (each {"index", "value", "normalized", "bound"}): most often a state in degrees
    instead of radians, or one normalized before sending (the server normalizes). `report` is the reply's
    whole `state_out_of_range` field. With the server's `out_of_range = "refuse"` the request is refused
    instead (`PolicyError`, code `out_of_range`)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report
        self.dims = list(report.get("dims") or [])


class ServerUnavailableError(TimeoutError):
    """No reply after every retry."""


class ConnectionDroppedError(ServerUnavailableError):
    """No reply, and the server closed the connection: it does so for a frame over its `max_frame_bytes`
    (or it restarted)."""


class PolicyClient:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 10.0,
        retries: int = 2,
        context: zmq.Context | None = None,
        server_key: str | None = None,
        client_key: str | None = None,
    ) -> None:
        """`server_key` (the daemon's public NAME.key file) and `client_key` (this controller's
        NAME.key_secret file, whose public half is on the daemon's allow-list) turn on CURVE."""
        self.endpoint = endpoint
        self.curve: tuple[bytes, bytes, bytes] | None = None
        if server_key or client_key:
            if not (server_key and client_key):
                raise ValueError("CURVE needs both server_key and client_key")
            # pyzmq's reader, not runtime.daemon.auth's: the controller's wheel carries only pi0_client.
            server_public, _ = zmq.auth.load_certificate(server_key)
            client_public, client_secret = zmq.auth.load_certificate(client_key)
            if client_secret is None:
                raise ValueError(f"{client_key} holds no secret key (give the .key_secret file)")
            self.curve = (server_public, client_public, client_secret)
        self.timeout_ms = int(timeout_s * 1000)
        self.retries = retries
        self.context = context or zmq.Context.instance()
        self.socket: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.limits: tuple[int | None, int | None] = (None, None)  # max frame, max request: from metadata()

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        # A REQ socket's send blocks while it has no usable connection (a refused CURVE handshake tears the
        # pipe down): bounded like the reply, so it ends as "no reply", never as a hang.
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        return sock

    def _was_dropped(self) -> bool:
        """Whether the server closed this socket's connection since it was opened."""
        dropped = False
        while self.monitor is not None and self.monitor.poll(0):
            dropped |= recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED
        return dropped

    def _drop_socket(self) -> None:
        if self.socket is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.socket.close(linger=0)
            self.socket = self.monitor = None

    def _check_size(self, arrays: dict[str, np.ndarray]) -> None:
        max_frame, max_request = self.limits
        sizes = {name: np.asarray(a).nbytes for name, a in arrays.items()}
        for name, size in sizes.items():
            if max_frame is not None and size > max_frame:
                raise RequestTooLargeError(
                    "too_large", f"{name} is {size} bytes; the server drops frames over {max_frame} (max_frame_bytes)"
                )
        if max_request is not None and sum(sizes.values()) > max_request:
            raise RequestTooLargeError(
                "too_large", f"the arrays add up to {sum(sizes.values())} bytes; the server takes {max_request}"
            )

    def request(
        self, kind: str, header: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None
    ) -> tuple[dict, dict]:
        """Send one request and return (header, arrays) of its successful reply."""
        request_id = uuid.uuid4().hex
        self._check_size(arrays or {})
        frames = protocol.encode({**(header or {}), "kind": kind, "id": request_id}, arrays)
        dropped = False
        for _ in range(self.retries + 1):
            if self.socket is None:
                self.socket = self._connect()
            try:
                self.socket.send_multipart(frames, copy=False)
            except zmq.Again:  # no connection took it within the timeout
                self._drop_socket()
                continue
            if self.socket.poll(self.timeout_ms, zmq.POLLIN):
                reply, reply_arrays = protocol.decode(self.socket.recv_multipart(copy=False))
                break
            dropped |= self._was_dropped()
            self._drop_socket()  # lazy pirate: a REQ socket cannot send again before it receives
        else:
            tries = f"{self.retries + 1} tries of {self.timeout_ms} ms"
            if dropped:
                largest = max((np.asarray(a).nbytes for a in (arrays or {}).values()), default=0)
                raise ConnectionDroppedError(
                    f"{self.endpoint} closed the connection without replying ({tries}); it does so for a frame "
                    f"over its max_frame_bytes (this request's largest: {largest} bytes; see metadata()), or it restarted"
                )
            raise ServerUnavailableError(f"no reply from {self.endpoint} in {tries}")
        if reply.get("id") not in (request_id, None):
            raise PolicyError("protocol", f"reply to request {reply.get('id')!r}, expected {request_id!r}")
        if not reply.get("ok"):
            error = reply.get("error") or {}
            cls = BusyError if error.get("code") == "busy" else PolicyError
            raise cls(str(error.get("code")), str(error.get("message")))
        return reply, reply_arrays

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """obs: arrays by LeRobot feature name (`observation.images.<camera>` uint8 HxWx3 or 3xHxW,
        `observation.state`; optionally `noise`, `lang_tokens`, `lang_masks`), plus `prompt` (str) and
        `seed` (int). Returns {"actions": [chunk, action_dim], "timing": {...}, "id": ...}, and "limits"
        when the daemon checks action limits: {"violations": n, "first": [...], "clamped": bool}; "frames"
        ({camera: note}) when a frame's aspect ratio is not its camera's (a client-side letterbox undone, or
        flagged). When the
        state is outside the policy's training range, "state_out_of_range" (the reply's report) too, and a
        `StateOutOfRangeWarning` naming the dimensions is raised with `warnings.warn`."""
        reply, reply_arrays = self.request("infer", *protocol.split_observation(obs))
        result = {"actions": reply_arrays["actions"], "timing": reply.get("timing", {}), "id": reply["id"]}
        for extra in ("limits", "frames"):  # frames: camera -> what was done to a frame of another aspect ratio
            if extra in reply:
                result[extra] = reply[extra]
        report = reply.get(protocol.STATE_OUT_OF_RANGE)
        if isinstance(report, dict):
            result[protocol.STATE_OUT_OF_RANGE] = report
            warnings.warn(StateOutOfRangeWarning(protocol.describe_state_out_of_range(report), report), stacklevel=2)
        return result

    def metadata(self) -> Metadata:
        """The server's description; also teaches this client the server's size limits."""
        meta = Metadata.from_dict(self.request("metadata")[0]["metadata"])
        self.limits = (meta.max_frame_bytes, meta.max_request_bytes)
        return meta

    def stats(self) -> dict[str, Any]:
        return self.request("stats")[0]["stats"]

    def ping(self) -> bool:
        return bool(self.request("ping")[0]["ok"])

    def reset(self) -> None:
        """Nothing to forget (each request stands alone): openpi's `BasePolicy` surface, so that
        openpi-client's ActionChunkBroker and runtime agents can wrap a PolicyClient as they are."""

    def close(self) -> None:
        self._drop_socket()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

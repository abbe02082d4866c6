"""The controller's client: numpy and pyzmq, nothing else.

    client = PolicyClient("tcp://robot:5555")
    result = client.infer({"observation.images.top": frame, "observation.state": q, "prompt": "transfer the cube"})
    result["actions"]  # [chunk, action_dim]

A REQ socket with the ZeroMQ guide's lazy-pirate pattern: when a reply does not come within
`timeout_s`, the socket is closed and reopened and the request sent again (`retries` times), so a
restarted daemon is picked up and a late reply to an abandoned request can never be read as the
answer to a new one. Error replies raise typed exceptions.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import zmq
import zmq.auth

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


class ServerUnavailableError(TimeoutError):
    """No reply after every retry."""


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
            # pyzmq's reader, not runtime.auth's: the controller's wheel carries only pi0_client.
            server_public, _ = zmq.auth.load_certificate(server_key)
            client_public, client_secret = zmq.auth.load_certificate(client_key)
            if client_secret is None:
                raise ValueError(f"{client_key} holds no secret key (give the .key_secret file)")
            self.curve = (server_public, client_public, client_secret)
        self.timeout_ms = int(timeout_s * 1000)
        self.retries = retries
        self.context = context or zmq.Context.instance()
        self.socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        sock.connect(self.endpoint)
        return sock

    def _drop_socket(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def request(
        self, kind: str, header: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None
    ) -> tuple[dict, dict]:
        """Send one request and return (header, arrays) of its successful reply."""
        request_id = uuid.uuid4().hex
        frames = protocol.encode({**(header or {}), "kind": kind, "id": request_id}, arrays)
        for _ in range(self.retries + 1):
            if self.socket is None:
                self.socket = self._connect()
            self.socket.send_multipart(frames, copy=False)
            if self.socket.poll(self.timeout_ms, zmq.POLLIN):
                reply, reply_arrays = protocol.decode(self.socket.recv_multipart(copy=False))
                break
            self._drop_socket()  # lazy pirate: a REQ socket cannot send again before it receives
        else:
            raise ServerUnavailableError(
                f"no reply from {self.endpoint} in {self.retries + 1} tries of {self.timeout_ms} ms"
            )
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
        when the daemon checks action limits: {"violations": n, "first": [...], "clamped": bool}."""
        reply, reply_arrays = self.request("infer", *protocol.split_observation(obs))
        result = {"actions": reply_arrays["actions"], "timing": reply.get("timing", {}), "id": reply["id"]}
        if "limits" in reply:
            result["limits"] = reply["limits"]
        return result

    def metadata(self) -> Metadata:
        return Metadata.from_dict(self.request("metadata")[0]["metadata"])

    def stats(self) -> dict[str, Any]:
        return self.request("stats")[0]["stats"]

    def ping(self) -> bool:
        return bool(self.request("ping")[0]["ok"])

    def close(self) -> None:
        self._drop_socket()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

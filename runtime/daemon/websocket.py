"""openpi's websocket endpoint, beside ZeroMQ, over the same service, queue and worker: robot code written
for openpi's `serve_policy.py` (`openpi_client.WebsocketClientPolicy`, its `ActionChunkBroker` and
runtime agents) talks to the appliance unchanged but for the host name.

As openpi's `WebsocketPolicyServer` does: on connect the server sends its metadata (msgpack); then each
binary message is an observation and is answered with `actions`, `policy_timing` and `server_timing`; an
error is a text frame (the reason) followed by close code 1011; `GET /healthz` answers 200. Beyond it: an
API key (`Authorization: Api-Key <key>`, which openpi-client sends when given `api_key`) from the
allow-list in the config, required off loopback; the intake limits (a message over `max_request_bytes`
+ 64 KiB is closed with 1009 before it is read); refusals counted and logged like ZeroMQ's; the state
guard's `state_out_of_range` warning as an extra key of the reply (openpi clients ignore it). Requests go
through the one queue: one inference at a time, whichever transport brought it.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from runtime.daemon import openpi_compat
from runtime.daemon.service import InferJob, Peer, Service
from runtime.daemon.work import WorkQueue, shutting_down_header
from runtime.pipeline.observation import ObservationError

log = logging.getLogger("pi0-runtime")
MESSAGE_SLACK = 64 * 1024  # msgpack framing around the arrays


class WebsocketEndpoint:
    def __init__(
        self, service: Service, work: WorkQueue, host: str, port: int, api_keys: frozenset[str] = frozenset()
    ) -> None:
        self.service, self.work, self.host, self.port, self.api_keys = service, work, host, port, api_keys
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.stopped: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="websocket", daemon=True)
        self.error: BaseException | None = None

    # --- lifecycle (called from the serving thread) ------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(timeout=30)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.loop is not None and self.stopped is not None:
            self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start(), which re-raises it in the serving thread
            self.error = e
            self.ready.set()

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        max_size = self.service.intake.max_request_bytes + MESSAGE_SLACK
        async with serve(
            self._handler, self.host, self.port, compression=None, max_size=max_size,
            process_request=self._process_request,
        ):  # fmt: skip
            log.info(
                "openpi websocket endpoint on ws://%s:%d%s",
                self.host,
                self.port,
                " (API keys)" if self.api_keys else "",
            )
            self.ready.set()
            await self.stopped.wait()

    # --- HTTP: health and API keys -----------------------------------------------------------------

    def _process_request(self, connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_keys:
            given = request.headers.get("Authorization", "")
            key = given.removeprefix("Api-Key ").strip() if given.startswith("Api-Key ") else ""
            if not any(hmac.compare_digest(key, allowed) for allowed in self.api_keys):
                self.service.refusal(
                    None, "unauthorized", "no or unknown API key", Peer(id(connection), _address(connection))
                )
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED, "an API key is required (Authorization: Api-Key ...)\n"
                )
        return None

    # --- one connection ----------------------------------------------------------------------------

    async def _handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = Peer(id(ws), _address(ws))
        metadata = self.service.metadata()
        try:
            await ws.send(openpi_compat.encode(metadata.to_dict()))
            previous_total_ms = None
            async for message in ws:
                start = time.monotonic()
                if isinstance(message, str):
                    await self._fail(
                        ws, self.service.refusal(None, "bad_request", "expected a binary msgpack message", peer)
                    )
                    return
                self.service.stats.request("infer", peer.connection, time.perf_counter())
                try:
                    obs = openpi_compat.observation(openpi_compat.decode(message), metadata)
                except ObservationError as e:
                    await self._fail(ws, self.service.refusal(None, "bad_request", str(e), peer))
                    return
                except Exception as e:  # a decoding bug must cost this connection one error, not the endpoint
                    log.exception("could not decode a websocket message")
                    text = f"could not decode the observation: {type(e).__name__}"
                    await self._fail(ws, self.service.refusal(None, "internal", text, peer))
                    return
                header, arrays = await self._infer(InferJob(None, obs, time.perf_counter(), peer), peer)
                if not header.get("ok"):
                    await self._fail(ws, header)
                    return
                out = openpi_compat.reply(header, arrays, (time.monotonic() - start) * 1e3)
                if previous_total_ms is not None:
                    out["server_timing"]["prev_total_ms"] = previous_total_ms
                await ws.send(openpi_compat.encode(out))
                previous_total_ms = (time.monotonic() - start) * 1e3
        except ConnectionClosed:
            pass

    async def _infer(self, job: InferJob, peer: Peer) -> tuple[dict, dict]:
        """Through the one queue and worker, like a ZeroMQ request."""
        if self.work.stopping:
            return shutting_down_header(None), {}
        future: Future = Future()
        if not self.work.submit(lambda header, arrays: future.set_result((header, arrays)), job):
            message = f"{self.work.size} requests are already waiting; retry later"
            return self.service.refusal(None, "busy", message, peer), {}
        return await asyncio.wrap_future(future)

    async def _fail(self, ws: Any, header: dict) -> None:
        """openpi's error: the reason as a text frame, then close code 1011."""
        error = header.get("error", {})
        text = f"{error.get('code')}: {error.get('message')}"
        await ws.send(text)
        await ws.close(code=1011, reason=text[:120])


def _address(connection: Any) -> str | None:
    try:
        return str(connection.remote_address[0])
    except (AttributeError, IndexError, TypeError):
        return None

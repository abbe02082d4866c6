"""The ZeroMQ transport: a ROUTER socket in front of the service (`runtime.daemon.service`).

The main thread owns the socket: it hands each request's frames to the service, sends what the service
answers at once (`metadata`/`stats`/`ping`, refusals), and puts `infer` jobs in a bounded queue (full: an
immediate `busy` reply). One worker thread runs the jobs in order and hands each reply back over an
inproc pipe; the main thread sends it. Every request gets exactly one reply, except one with a frame
over `max_frame_bytes`: libzmq drops that connection before allocating the frame (`runtime.daemon.intake`).
Frames beyond what a request can have are released as they are read.

systemd: READY=1 after the bundle is loaded and a warm-up inference ran; WATCHDOG=1 only while the
worker is not stuck on a request (a hung backend stops the pings, and systemd restarts us); STATUS=
with live latency; on SIGTERM, STOPPING=1, queued requests answered `shutting_down`, the one in flight
finished and delivered, then exit 0. With `metrics_endpoint`, Prometheus metrics and the health endpoints
(`runtime.daemon.metrics`): /healthz follows the watchdog's rule, /readyz turns 200 with READY=1 and 503
again on SIGTERM, while the daemon drains.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pi0_client import protocol
from runtime.daemon import systemd
from runtime.daemon.config import ServerConfig
from runtime.daemon.intake import RCVHWM, REQUEST_FRAMES, SNDHWM, give_back_memory
from runtime.daemon.metrics import BundleLabels, HttpEndpoint, Metrics
from runtime.daemon.service import InferJob, Peer, ServedEngine, Service
from runtime.daemon.stats import summarize
from runtime.daemon.websocket import WebsocketEndpoint
from runtime.daemon.work import Reply, WorkQueue, shutting_down_header

log = logging.getLogger("pi0-runtime")


class Server:
    def __init__(self, engine_factory: Callable[[], ServedEngine], config: ServerConfig) -> None:
        self.service = Service(
            engine_factory,
            config.limits,
            config.queue_size,
            config.max_frame_bytes,
            config.log_interval_s,
            config.state_range,
        )
        self.config = config
        self.work = WorkQueue(self.service.execute, config.queue_size)
        self.context = zmq.Context.instance()
        self._pipe: zmq.Socket | None = None  # the worker thread's end of inproc://replies
        self.warmed_up = False
        self.http: HttpEndpoint | None = None
        if config.metrics is not None:
            metadata = self.service.engine.metadata()
            labels = BundleLabels(
                config.bundle_name, metadata.source, metadata.precision, metadata.backend, config.fell_back_from
            )
            self.service.stats.metrics = Metrics(config.robot, labels)
            self.service.stats.metrics.watch(
                queue_depth=self.work.jobs.qsize,
                inflight=lambda: float(self.work.busy_since is not None),
                ready=self.ready,
            )
            self.http = HttpEndpoint(
                *config.metrics, self.service.stats.metrics, self.healthy, self.ready, config.metrics_api_keys
            )

    @property
    def engine(self) -> ServedEngine:
        return self.service.engine

    # --- worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        self._pipe = self.context.socket(zmq.PAIR)
        self._pipe.connect("inproc://replies")
        self.work.run()
        self._pipe.close()

    def _reply_to(self, identity: Any) -> Reply:
        """A ZeroMQ request's reply, sent by the worker thread over the pipe (the main thread owns the router)."""

        def deliver(header: dict[str, Any], arrays: dict[str, Any]) -> None:
            # Replies are small: copying beats pyzmq's zero-copy bookkeeping (measured 0.33 -> 0.12 ms a hop).
            self._pipe.send_multipart([identity, b"", *protocol.encode(header, arrays)], copy=True)

        return deliver

    # --- main thread -------------------------------------------------------------------------------

    def _send(self, router: zmq.Socket, identity: Any, frames: list[Any]) -> None:
        router.send_multipart([identity, b"", *frames], copy=True)

    def _shutting_down(self, request_id: Any) -> list[Any]:
        return protocol.encode(shutting_down_header(request_id))

    def _receive(self, router: zmq.Socket) -> tuple[list[Any], int]:
        """One message, frame by frame: [identity, delimiter, header, arrays...] up to what a request can
        have; the frames beyond are released as they are read. -> (frames kept, frames dropped)."""
        frames: list[Any] = []
        dropped, more = 0, True
        while more:
            frame = router.recv(copy=False)
            more = frame.more
            if len(frames) < 2 + REQUEST_FRAMES:
                frames.append(frame)
            else:
                dropped += 1  # released here: nothing keeps it
        return frames, dropped

    def _handle(self, router: zmq.Socket) -> None:
        message, dropped = self._receive(router)
        identity = message[0]
        peer = Peer(bytes(identity.bytes), _peer_address(message[-1]))
        if dropped:
            total = len(message) - 2 + dropped
            reply = self.service.refuse(
                None, "bad_request", f"{total} frames; a request has at most {REQUEST_FRAMES} (header + arrays)", peer
            )
            self._send(router, identity, reply)
            return
        if len(message) < 3 or message[1].bytes != b"":
            reply = self.service.refuse(None, "bad_request", "expected [empty delimiter, header, arrays...]", peer)
            self._send(router, identity, reply)
            return
        result = self.service.handle(message[2:], peer)
        if not isinstance(result, InferJob):
            self._send(router, identity, result)
        elif self.work.stopping:
            self._send(router, identity, self._shutting_down(result.request_id))
        elif not self.work.submit(self._reply_to(identity), result):
            text = f"{self.config.queue_size} requests are already waiting; retry later"
            self._send(router, identity, self.service.refuse(result.request_id, "busy", text, peer))

    def _request_stop(self, *_: object) -> None:
        self.work.stopping = True

    def healthy(self) -> bool:
        """Live: the engine is not stuck on a request past hang_timeout_s (the watchdog's rule)."""
        return self.work.stuck_for() < self.config.hang_timeout_s

    def ready(self) -> bool:
        """Ready: warmed up and not draining (a load balancer or a fleet dashboard reads this)."""
        return self.warmed_up and not self.work.stopping

    def status_line(self) -> str:
        stats = self.service.stats
        total = summarize(stats.latencies["total_ms"])
        if not total:
            return "STATUS=serving, no requests yet"
        return f"STATUS=serving: {stats.counts['ok']} chunks, total p50 {total['p50']:.1f} ms p99 {total['p99']:.1f} ms"

    def serve(self) -> int:
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 2000)
        router.setsockopt(zmq.MAXMSGSIZE, self.service.intake.max_frame_bytes)
        router.setsockopt(zmq.RCVHWM, RCVHWM)
        router.setsockopt(zmq.SNDHWM, SNDHWM)
        authenticator = self.config.curve.secure(self.context, router) if self.config.curve else None
        router.bind(self.config.endpoint)
        replies = self.context.socket(zmq.PAIR)
        replies.bind("inproc://replies")
        worker = threading.Thread(target=self._work, name="engine", daemon=True)
        worker.start()
        websocket = None
        if self.config.websocket is not None:
            websocket = WebsocketEndpoint(
                self.service, self.work, *self.config.websocket, api_keys=self.config.api_keys
            )
            websocket.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request_stop)
        if self.http is not None:
            self.http.start()  # live at once; ready (200 on /readyz) only after the warm-up

        if self.config.warm_up:
            log.info("warming up ...")
            timing = self.service.warm_up()
            log.info("ready on %s (warm-up %.1f ms)", self.config.endpoint, timing["total_ms"])
        else:
            log.info("ready on %s", self.config.endpoint)
        log.info("intake: %s", self.service.intake.describe())
        guard = self.service.state_guard
        log.info("%s", guard.describe() if guard is not None else "state range: not checked")
        # Everything the loop will import lazily, imported now: once a flood of connections has taken
        # every descriptor the unit allows, an import (numpy's percentile pulls in numpy.ma) fails with
        # EMFILE and would end the loop (seen under LimitNOFILE in the nspawn test).
        summarize([0.0, 1.0])
        self.warmed_up = True
        systemd.notify("READY=1")
        systemd.notify(self.status_line())
        ping_every = systemd.watchdog_interval()
        last_ping = last_status = 0.0
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        while True:
            events = dict(poller.poll(timeout=100))
            if replies in events:
                router.send_multipart(replies.recv_multipart())
            if router in events and not self.work.stopping:
                self._handle(router)
            if self.service.refusals.flush():
                give_back_memory()  # after a burst of refused requests and connections
            self.service.warnings.flush()
            now = time.monotonic()
            if ping_every and now - last_ping >= ping_every and self.healthy():
                systemd.notify("WATCHDOG=1")
                last_ping = now
            if now - last_status >= self.config.status_interval_s:
                systemd.notify(self.status_line())
                last_status = now
            if self.work.stopping:
                break
        code = self._stop(router, replies, worker)
        if websocket is not None:
            websocket.stop()
        if self.http is not None:
            self.http.stop()
        if authenticator is not None:
            authenticator.stop()
        return code

    def _stop(self, router: zmq.Socket, replies: zmq.Socket, worker: threading.Thread) -> int:
        systemd.notify("STOPPING=1")
        log.info("stopping: answering queued requests, finishing the one in flight")
        # Answer whatever arrived but was not read yet, then what waits in the queue.
        while router.poll(0):
            message = router.recv_multipart(copy=False)
            if len(message) >= 3:
                self._send(router, message[0], self._shutting_down(None))
        self.work.finish()  # the worker answers what waits in the queue, over the pipe as always
        while worker.is_alive() or replies.poll(0):
            if replies.poll(100):
                router.send_multipart(replies.recv_multipart())
        worker.join()
        router.close()
        replies.close()
        self.service.close()
        log.info("stopped")
        return 0


def _peer_address(frame: zmq.Frame) -> str | None:
    """The sender's address as libzmq reports it (TCP: its IP), for the refusal summaries."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:  # ipc/inproc: no address
        return None

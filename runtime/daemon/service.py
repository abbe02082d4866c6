"""What the daemon does with one request, whatever transport brought it: decode it, answer `metadata`,
`stats` and `ping`, validate an `infer` and run the engine, build the reply, count and log.

Transport-free and synchronous: `handle(frames)` returns the reply's frames, or for `infer` a job that
`run(job)` turns into them (the transport decides when: `runtime.daemon.server` runs jobs one at a time on a
worker thread). Every refusal goes through `refuse`, so each is counted, logged and encoded alike.

Before the engine runs, the state guard (`runtime.daemon.state_guard`) holds the request's state to the
policy's training statistics: out of range, the request is refused (`out_of_range`) or served with a
`state_out_of_range` warning in its reply, counted and logged like refusals (`warnings`, per interval).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from pi0_client import protocol
from pi0_client.metadata import Metadata
from runtime.daemon.intake import Intake
from runtime.daemon.limits import ActionLimits
from runtime.daemon.refusals import RefusalLog
from runtime.daemon.state_guard import StateGuard, StateRangeSettings
from runtime.daemon.stats import Stats
from runtime.engine import EngineError
from runtime.pipeline.observation import Observation, ObservationError

log = logging.getLogger("pi0-runtime")
DEVICE_MEMORY_EVERY_S = 1.0


class ServedEngine(Protocol):
    """What the service needs from what it serves: `runtime.engine.Engine`, or a stand-in with the same
    surface (the sim's scripted oracle), so that a client cannot tell them apart. One with a `spec` (a
    `PolicySpec` with state statistics, as `Engine` has) gets the state guard too."""

    def metadata(self) -> Metadata: ...

    def infer(
        self, obs: Observation, trace: dict | None = None, notes: dict[str, str] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]: ...

    def close(self) -> None: ...

    def device_memory(self) -> tuple[int, int] | None:
        """(used, total) bytes of the accelerator's memory; None where there is none to report."""
        ...


@dataclass
class InferJob:
    """A decoded `infer` request waiting for the engine. Its arrays are views of the received frames:
    the frames live as long as the job does."""

    request_id: Any
    observation: Observation
    received: float  # time.perf_counter() when it arrived
    peer: Peer | None = None


@dataclass(frozen=True)
class Peer:
    """Who sent a request, as far as the transport knows: a connection id and its address."""

    connection: Any = None
    address: str | None = None


class Service:
    def __init__(
        self,
        engine_factory: Callable[[], ServedEngine],
        limits: ActionLimits | None = None,
        queue_size: int = 4,
        max_frame_bytes: int | None = None,
        log_interval_s: float = 10.0,
        state_range: StateRangeSettings | None = None,
    ) -> None:
        self.engine_factory = engine_factory
        self.engine = engine_factory()
        self.limits = limits or ActionLimits()
        self.intake = Intake.for_metadata(self.engine.metadata(), queue_size, max_frame_bytes)
        self.stats = Stats()
        self.refusals = RefusalLog(log_interval_s)
        self.warnings = RefusalLog(log_interval_s, verb="warned")  # served, with a warning in the reply
        # None: turned off, or nothing to check against (an engine without state statistics)
        self.state_guard = StateGuard.for_engine(self.engine, state_range or StateRangeSettings())
        self._memory_sampled = -DEVICE_MEMORY_EVERY_S

    def refusal(self, request_id: Any, code: str, message: str, peer: Peer | None = None) -> dict[str, Any]:
        """Count and log (rate-limited) one refusal -> its reply header."""
        self.stats.refusal(code)
        peer = peer or Peer()
        self.refusals.record(code, request_id, message, peer.connection, peer.address)
        return protocol.error_header(request_id, code, message)

    def refuse(self, request_id: Any, code: str, message: str, peer: Peer | None = None) -> list[Any]:
        """`refusal`, encoded as the ZeroMQ reply's frames."""
        return protocol.encode(self.refusal(request_id, code, message, peer))

    def metadata(self) -> Metadata:
        """The engine's metadata with this server's intake limits, so a client can check before sending."""
        return replace(
            self.engine.metadata(),
            max_frame_bytes=self.intake.max_frame_bytes,
            max_request_bytes=self.intake.max_request_bytes,
        )

    def handle(self, frames: list[Any], peer: Peer | None = None) -> list[Any] | InferJob:
        """One request's frames (header, arrays) -> the reply's frames, or the `infer` job to run."""
        received = time.perf_counter()
        try:
            header, arrays = protocol.decode(frames)
        except protocol.ProtocolError as e:
            return self.refuse(None, e.code, e.message, peer)
        except Exception as e:  # a decoder bug must cost one reply, not the serving loop
            log.exception("could not decode a request")
            return self.refuse(None, "internal", f"could not decode the request: {type(e).__name__}", peer)
        request_id, kind = header.get("id"), header.get("kind")
        if kind == "infer":
            self.stats.request(kind, (peer or Peer()).connection, received)
        else:
            self.stats.request(kind)
        if kind == "ping":
            return protocol.encode({"id": request_id, "ok": True, "kind": "ping"})
        if kind == "metadata":
            metadata = self.metadata().to_dict()
            return protocol.encode({"id": request_id, "ok": True, "kind": "metadata", "metadata": metadata})
        if kind == "stats":
            return protocol.encode({"id": request_id, "ok": True, "kind": "stats", "stats": self.stats.summary()})
        if kind != "infer":
            return self.refuse(
                request_id,
                "unknown_kind",
                f"unknown request kind {kind!r}; expected one of {list(protocol.KINDS)}",
                peer,
            )
        size = sum(a.nbytes for a in arrays.values())
        if size > self.intake.max_request_bytes:
            message = f"request of {size} bytes exceeds this server's {self.intake.max_request_bytes} (metadata max_request_bytes)"
            return self.refuse(request_id, "bad_request", message, peer)
        try:
            return InferJob(request_id, Observation.from_request(header, arrays), received, peer)
        except ObservationError as e:
            return self.refuse(request_id, "bad_request", str(e), peer)

    def run(self, job: InferJob) -> list[Any]:
        """Run the engine on one job -> the reply's frames (actions, or an error)."""
        return protocol.encode(*self.execute(job))

    def execute(self, job: InferJob) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Run the engine on one job -> the reply's header and arrays (`actions`), or an error header;
        each transport encodes it its own way."""
        state_report = self._check_state(job)
        if state_report is not None and self.state_guard.refuses:
            message = protocol.describe_state_out_of_range(state_report) + " (nothing was computed)"
            header = self.refusal(job.request_id, protocol.OUT_OF_RANGE, message, job.peer)
            return {**header, protocol.STATE_OUT_OF_RANGE: state_report}, {}
        try:
            frames: dict[str, str] = {}
            actions, timing = self.engine.infer(job.observation, notes=frames)
        except EngineError as e:
            return self.refusal(job.request_id, e.code, e.message, job.peer), {}
        except Exception as e:  # a backend failure: answer, then start from a fresh engine
            log.exception("request %s failed in the backend; rebuilding the engine", job.request_id)
            self._rebuild_engine()
            return self.refusal(job.request_id, "internal", f"backend error: {e}", job.peer), {}
        reply = {"id": job.request_id, "ok": True, "kind": "infer", "timing": timing}
        if frames:  # a frame letterboxed by the client (undone), or of another aspect ratio (flagged)
            reply["frames"] = frames
            self.stats.warning("frames_reshaped")
            peer = job.peer or Peer()
            message = "; ".join(f"camera {key}: {note}" for key, note in frames.items())
            self.warnings.record("frames", job.request_id, message, peer.connection, peer.address)
        if state_report is not None:
            reply[protocol.STATE_OUT_OF_RANGE] = state_report
            self.stats.warning("out_of_range_warnings")
            peer = job.peer or Peer()
            message = protocol.describe_state_out_of_range(state_report)
            self.warnings.record(protocol.STATE_OUT_OF_RANGE, job.request_id, message, peer.connection, peer.address)
        if self.limits.active:
            actions, reply["limits"] = self.limits.apply(actions)
            if reply["limits"]["violations"]:
                self.stats.warning("limit_violations")
                log.warning(
                    "request %s: %d action limit violation(s)%s, first %s",
                    job.request_id,
                    reply["limits"]["violations"],
                    " clamped" if reply["limits"]["clamped"] else "",
                    reply["limits"]["first"][0],
                )
        timing["queue_ms"] = (time.perf_counter() - job.received) * 1e3 - timing["total_ms"]
        self.stats.served(timing)
        self._sample_device_memory()
        return reply, {"actions": actions}

    def _check_state(self, job: InferJob) -> dict[str, Any] | None:
        """The state guard's report on the job's state (None: in range, or not checked). A failure of the
        check itself is logged and costs nothing else: the request is served as without the guard."""
        if self.state_guard is None:
            return None
        try:
            return self.state_guard.check(job.observation.state)
        except Exception:
            log.exception("request %s: the state range check failed; serving it unchecked", job.request_id)
            return None

    def warm_up(self) -> dict[str, float]:
        """An inference on a synthetic observation through each graph the engine serves (guidance's too),
        so the first real request is not the slow one -> the first one's timing."""
        timings = [self.engine.infer(obs)[1] for obs in self.engine.warm_up_requests()]
        return timings[0]

    def _rebuild_engine(self) -> None:
        try:
            self.engine.close()
        except Exception:
            log.exception("closing the failed engine")
        self.engine = self.engine_factory()
        self.stats.restart()

    def _sample_device_memory(self) -> None:
        """The accelerator's memory, where the backend reports it, at most once a second (on the worker
        thread: ACL answers only where the device's context is current)."""
        now = time.monotonic()
        if now - self._memory_sampled < DEVICE_MEMORY_EVERY_S:
            return
        self._memory_sampled = now
        try:
            memory = self.engine.device_memory()
        except Exception:  # a figure for dashboards must never cost a request
            log.exception("reading the device's memory failed")
            return
        if memory is not None:
            self.stats.device_memory(*memory)

    def close(self) -> None:
        self.engine.close()

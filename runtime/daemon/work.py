"""The one queue in front of the engine, shared by every transport (ZeroMQ, the websocket).

A transport `submit`s an infer job with a `Reply`: a callable the worker thread calls with the job's
reply (header, arrays), which takes it back to the transport (over the ZeroMQ server's inproc pipe, or
into the websocket connection's future). The queue is bounded: a full one refuses the job and the
transport answers `busy`. One worker runs the jobs in order. On stop, the job in flight is finished and
delivered and every job still queued is answered `shutting_down` by the worker, so that all replies
leave from the thread that delivers them.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from pi0_client import protocol
from runtime.daemon.service import InferJob

Reply = Callable[[dict[str, Any], dict[str, Any]], None]


def shutting_down_header(request_id: Any) -> dict[str, Any]:
    return protocol.error_header(request_id, "shutting_down", "the server is stopping")


class WorkQueue:
    def __init__(self, execute: Callable[[InferJob], tuple[dict[str, Any], dict[str, Any]]], size: int) -> None:
        self.execute = execute
        self.size = size
        self.jobs: queue.Queue = queue.Queue(maxsize=size)
        # A plain flag, not a threading.Event: a signal handler sets it, and a handler that takes a lock
        # deadlocks when a second signal lands while the first holds it (seen: SIGTERMs in a burst).
        self.stopping = False
        self.busy_since: float | None = None  # when the worker took its current job

    def submit(self, reply: Reply, job: InferJob) -> bool:
        """Queue a job; False when the queue is full (the transport answers `busy`)."""
        try:
            self.jobs.put_nowait((reply, job))
        except queue.Full:
            return False
        return True

    def run(self) -> None:
        """The worker: jobs in order until `finish`; once stopping, queued jobs are answered, not run."""
        while (item := self.jobs.get()) is not None:
            reply, job = item
            if self.stopping:
                reply(shutting_down_header(job.request_id), {})
                continue
            self.busy_since = time.perf_counter()
            header, arrays = self.execute(job)
            self.busy_since = None
            reply(header, arrays)

    def finish(self) -> None:
        """Stop taking jobs; the worker answers what is queued and returns (call once, after `stopping`)."""
        self.stopping = True
        self.jobs.put(None)

    def stuck_for(self) -> float:
        """Seconds the worker has been on its current job (0 when idle)."""
        started = self.busy_since
        return 0.0 if started is None else time.perf_counter() - started

"""Refusals logged so that a flood cannot become a flood of lines.

Every refusal is counted (the `stats` reply has them all). In the log: the first refusal of a kind is
written in full, at once; while that kind keeps coming, its later refusals are only counted, and once
per interval one summary line per kind says how many, from how many connections and addresses, with the
latest message. A kind that stayed quiet for a whole interval is logged in full again the next time.
So a flood costs at most one line per kind per interval.

The same log, with `verb="warned"`, summarizes requests served with a warning (the state guard's
`state_out_of_range`: runtime.daemon.state_guard). Transports and the engine's worker record from their
own threads and the serving loop flushes: a lock keeps the windows whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pi0-runtime")


@dataclass
class _Window:
    count: int = 0
    connections: set = field(default_factory=set)
    addresses: set = field(default_factory=set)
    last: str = ""


class RefusalLog:
    def __init__(
        self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic, verb: str = "refused"
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.verb = verb
        self.lock = threading.Lock()
        self.window_start = clock()
        self.current: dict[str, _Window] = {}  # refusals counted in this interval, by kind
        self.active: set[str] = set()  # kinds seen in this interval or the one before: not "first" again

    def record(
        self, code: str, request_id: Any, message: str, connection: Any = None, address: str | None = None
    ) -> None:
        with self.lock:
            self._flush()
            if code not in self.active:
                self.active.add(code)
                log.warning("request %s %s (%s): %s", request_id, self.verb, code, message)
                self.current.setdefault(code, _Window())
                return
            window = self.current.setdefault(code, _Window())
            window.count += 1
            if connection is not None:
                window.connections.add(connection)
            if address:
                window.addresses.add(address)
            window.last = message

    def flush(self) -> bool:
        """At the end of an interval: one summary line per kind refused more than once in it. -> whether
        an interval with refusals just ended."""
        with self.lock:
            return self._flush()

    def _flush(self) -> bool:
        now = self.clock()
        if now - self.window_start < self.interval_s:
            return False
        ended_busy = bool(self.current)
        for code, window in sorted(self.current.items()):
            if window.count:
                log.warning(
                    "%s %d more %s in the last %.0f s from %d connection(s), %d address(es); latest: %s",
                    self.verb, window.count, code, now - self.window_start, len(window.connections) or 1,
                    len(window.addresses) or 1, window.last,
                )  # fmt: skip
        self.active = set(self.current)
        self.current = {}
        self.window_start = now
        return ended_busy

"""The daemon's figures for dashboards: Prometheus metrics (`prometheus_client`, the ecosystem's own library)
and health endpoints the way Triton and KServe expose them, on an HTTP port of their own.

    GET /metrics            Prometheus' text format
    GET /healthz            200 while the process serves (the engine is not stuck past hang_timeout_s), else 503
    GET /readyz             200 once warmed up, 503 before that and while draining after SIGTERM
    GET /v2/health/live     /healthz under KServe's v2 name
    GET /v2/health/ready    /readyz under KServe's v2 name

Every pi0_ metric carries the labels `robot` (the config's `robot`, "" when unset) and `bundle` (the served
bundle's directory name: the store's version). Durations are in seconds, as Prometheus names them:

    pi0_requests_total{kind}                every request, by kind (infer, metadata, stats, ping, ...)
    pi0_request_success_total               infer requests answered with actions
    pi0_request_failure_total{reason}       requests refused, by refusal code (busy, bad_request, out_of_range, ...)
    pi0_request_warnings_total{kind}        served with a warning: out_of_range_warnings (the state guard's),
                                            frames_reshaped, limit_violations (the names `stats` counts)
    pi0_{queue,preprocess,vlm,expert,postprocess}_duration_seconds   histograms, per served request
    pi0_request_duration_seconds            histogram: the server's whole time on a request, queue included
    pi0_request_interval_seconds            histogram: between consecutive infer requests of one connection
                                            (a robot's control cadence as the server sees it)
    pi0_queue_depth, pi0_inflight_requests  gauges
    pi0_ready                               1 once warmed up and not draining
    pi0_engine_restarts_total               engines rebuilt after a backend failure
    pi0_device_memory_used_bytes / _total_bytes   where the backend reports it (ACL: aclrtGetMemInfo)
    pi0_bundle_info{source, precision, backend, fell_back_from}   1; the served bundle
    process_resident_memory_bytes, ...      prometheus_client's process collector (RSS, CPU, descriptors)

Recording costs a few microseconds a request (pre-bound label children; `make bench`'s service benchmark
measures the serving loop with and without them). The HTTP server runs on its own thread, never on the
serving loop's.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger("pi0-runtime")

LABELS = ("robot", "bundle")
# Seconds. Chunks take milliseconds on an accelerator and up to seconds for a real pi0 on a CPU.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
INTERVAL_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STAGE_METRICS = {  # Stats' stage (milliseconds) -> histogram name
    "queue_ms": "pi0_queue_duration_seconds",
    "preprocess_ms": "pi0_preprocess_duration_seconds",
    "vlm_ms": "pi0_vlm_duration_seconds",
    "expert_ms": "pi0_expert_duration_seconds",
    "postprocess_ms": "pi0_postprocess_duration_seconds",
    "total_ms": "pi0_request_duration_seconds",
}


@dataclass(frozen=True)
class BundleLabels:
    """What the metrics say about the served bundle."""

    name: str  # its directory name (in the store: the version)
    source: str = ""
    precision: str = ""
    backend: str = ""
    fell_back_from: str = ""  # the `current` bundle that failed verification at start, if this is `previous`


class Metrics:
    """The daemon's Prometheus metrics in a registry of their own (several daemons in one test process
    do not mix). `runtime.daemon.stats.Stats` forwards each event it counts (`requested`, `interval`,
    `served`, `refused`, `warned`, `restarted`); the server gives the gauges their sources with `watch`."""

    def __init__(self, robot: str, bundle: BundleLabels) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        values = (robot, bundle.name)
        self._values = values

        def counter(name: str, text: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, text, LABELS + extra, registry=self.registry)

        self._requests = counter("pi0_requests", "Requests received, by kind.", ("kind",))
        self._success = counter("pi0_request_success", "Infer requests answered with actions.").labels(*values)
        self._failure = counter("pi0_request_failure", "Requests refused, by refusal code.", ("reason",))
        self._warnings = counter("pi0_request_warnings", "Requests served with a warning, by kind.", ("kind",))
        self._restarts = counter("pi0_engine_restarts", "Engines rebuilt after a backend failure.").labels(*values)
        self._stages = {
            stage: Histogram(name, f"Seconds per request: {stage[:-3]}.", LABELS, registry=self.registry,
                             buckets=DURATION_BUCKETS).labels(*values)
            for stage, name in STAGE_METRICS.items()
        }  # fmt: skip
        self._interval = Histogram(
            "pi0_request_interval_seconds",
            "Seconds between consecutive infer requests of one connection.",
            LABELS,
            registry=self.registry,
            buckets=INTERVAL_BUCKETS,
        ).labels(*values)
        self._gauges = {
            name: Gauge(name, text, LABELS, registry=self.registry).labels(*values)
            for name, text in (
                ("pi0_queue_depth", "Infer requests waiting for the engine."),
                ("pi0_inflight_requests", "Infer requests the engine is running (0 or 1)."),
                ("pi0_ready", "1 once warmed up and not draining."),
                ("pi0_device_memory_used_bytes", "Accelerator memory in use, where the backend reports it."),
                ("pi0_device_memory_total_bytes", "Accelerator memory available to the daemon."),
            )
        }
        info = Info("pi0_bundle", "The served bundle.", LABELS, registry=self.registry).labels(*values)
        info.info(
            {
                "source": bundle.source,
                "precision": bundle.precision,
                "backend": bundle.backend,
                "fell_back_from": bundle.fell_back_from,
            }
        )
        self._per_kind: dict[tuple[str, str], Any] = {}  # (metric, label) -> its child, made once

    def _child(self, metric: Counter, key: str, label: str) -> Any:
        child = self._per_kind.get((key, label))
        if child is None:
            child = self._per_kind[(key, label)] = metric.labels(*self._values, label)
        return child

    # --- the service's events ---------------------------------------------------------------------

    def requested(self, kind: str) -> None:
        self._child(self._requests, "requests", str(kind)).inc()

    def interval(self, seconds: float) -> None:
        """Seconds since the same connection's previous infer request."""
        self._interval.observe(seconds)

    def served(self, timing: dict[str, float]) -> None:
        self._success.inc()
        for stage, histogram in self._stages.items():
            if stage in timing:
                histogram.observe(timing[stage] / 1e3)

    def refused(self, code: str) -> None:
        self._child(self._failure, "failure", code).inc()

    def warned(self, kind: str) -> None:
        self._child(self._warnings, "warnings", kind).inc()

    def restarted(self) -> None:
        self._restarts.inc()

    def device_memory(self, used: int, total: int) -> None:
        self._gauges["pi0_device_memory_used_bytes"].set(used)
        self._gauges["pi0_device_memory_total_bytes"].set(total)

    # --- the server's state -----------------------------------------------------------------------

    def watch(self, queue_depth: Callable[[], float], inflight: Callable[[], float], ready: Callable[[], bool]) -> None:
        """Read these when scraped (the values live in the server)."""
        self._gauges["pi0_queue_depth"].set_function(queue_depth)
        self._gauges["pi0_inflight_requests"].set_function(inflight)
        self._gauges["pi0_ready"].set_function(lambda: float(ready()))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HttpEndpoint:
    """/metrics and the health endpoints on their own port and thread. With `api_keys`, /metrics needs
    `Authorization: Bearer KEY` (Prometheus' `authorization: {credentials_file: ...}`); the health endpoints
    never do (they say nothing but up or not, and probes rarely carry credentials)."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        api_keys: frozenset[str] = frozenset(),
    ) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, content_type = endpoint.answer(self.path, self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:  # scrapes every few seconds: not for the journal
                pass

        self.metrics, self.live, self.ready, self.api_keys = metrics, live, ready, api_keys
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def answer(self, path: str, authorization: str | None) -> tuple[int, bytes, str]:
        """(status, body, content type) for a GET of `path`."""
        path = path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if path in ("/healthz", "/v2/health/live"):
            return (200, b"live\n", text) if self.live() else (503, b"stuck\n", text)
        if path in ("/readyz", "/v2/health/ready"):
            return (200, b"ready\n", text) if self.ready() else (503, b"not ready\n", text)
        if path == "/metrics":
            if self.api_keys and not self._authorized(authorization):
                return 401, b"an API key is required: Authorization: Bearer KEY\n", text
            return 200, self.metrics.exposition(), CONTENT_TYPE_LATEST
        return 404, b"not found: /metrics, /healthz, /readyz, /v2/health/live, /v2/health/ready\n", text

    def _authorized(self, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(key.strip(), k) for k in self.api_keys)

    def start(self) -> None:
        self.thread.start()
        host, port = self.address
        log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)", host, port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""Metrics and health (runtime/daemon/metrics.py): what each event counts, the HTTP endpoint's answers and
its exposure rules, readiness through warm-up and drain on the real server, and a real Prometheus
(Debian's package) scraping a real daemon and answering queries over its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, observation_for
from prometheus_client.parser import text_string_to_metric_families

from pi0_client.client import PolicyClient, PolicyError
from runtime.daemon.auth import AuthConfigError
from runtime.daemon.config import DEFAULTS, server_config
from runtime.daemon.metrics import BundleLabels, HttpEndpoint, Metrics
from runtime.daemon.stats import Stats
from runtime.errors import ConfigError


def value(text: str, name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels`, from Prometheus' text format."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_each_event_is_counted_with_the_robot_and_bundle_labels() -> None:
    metrics = Metrics("arm-1", BundleLabels("20261207T010000Z-abc", "ckpt", "fp16", "acl"))
    stats = Stats(metrics=metrics)
    stats.request("infer", "robot-a", at=10.0)
    stats.request("infer", "robot-a", at=10.25)  # robot-a's cadence: 250 ms
    stats.request("infer", "robot-b", at=11.0)  # robot-b's first: no interval yet
    stats.request("ping")
    stats.served(
        {"queue_ms": 1, "preprocess_ms": 2, "vlm_ms": 30, "expert_ms": 40, "postprocess_ms": 1, "total_ms": 74}
    )
    stats.refusal("busy")
    stats.refusal("busy")
    stats.refusal("bad_request")
    stats.warning("limit_violations")
    stats.restart()
    stats.device_memory(5 * 2**20, 21 * 2**30)
    text = metrics.exposition().decode()
    mine = {"robot": "arm-1", "bundle": "20261207T010000Z-abc"}
    assert value(text, "pi0_requests_total", kind="infer", **mine) == 3
    assert value(text, "pi0_requests_total", kind="ping", **mine) == 1
    assert value(text, "pi0_request_success_total", **mine) == 1
    assert value(text, "pi0_request_failure_total", reason="busy", **mine) == 2
    assert value(text, "pi0_request_failure_total", reason="bad_request", **mine) == 1
    assert value(text, "pi0_request_warnings_total", kind="limit_violations", **mine) == 1
    assert value(text, "pi0_engine_restarts_total", **mine) == 1
    assert value(text, "pi0_request_interval_seconds_count", **mine) == 1
    assert value(text, "pi0_request_interval_seconds_sum", **mine) == pytest.approx(0.25)
    # Milliseconds in, seconds out: 74 ms falls in the 0.075 s bucket and not in the 0.05 s one.
    assert value(text, "pi0_request_duration_seconds_sum", **mine) == pytest.approx(0.074)
    assert value(text, "pi0_request_duration_seconds_bucket", le="0.075", **mine) == 1
    assert value(text, "pi0_request_duration_seconds_bucket", le="0.05", **mine) == 0
    assert value(text, "pi0_vlm_duration_seconds_sum", **mine) == pytest.approx(0.030)
    assert value(text, "pi0_expert_duration_seconds_sum", **mine) == pytest.approx(0.040)
    assert value(text, "pi0_device_memory_used_bytes", **mine) == 5 * 2**20
    assert value(text, "pi0_bundle_info", precision="fp16", backend="acl", fell_back_from="", **mine) == 1
    assert value(text, "process_resident_memory_bytes") > 0
    # The `stats` request answers the same counts, and the cadence in milliseconds.
    summary = stats.summary()
    assert summary["counts"]["ok"] == 1 and summary["counts"]["busy"] == 2 and summary["counts"]["kind:infer"] == 3
    assert summary["latency_ms"]["interval_ms"]["p50"] == pytest.approx(250.0)
    assert summary["device_memory_bytes"] == {"used": 5 * 2**20, "total": 21 * 2**30}


def test_connections_are_remembered_up_to_a_bound() -> None:
    from runtime.daemon.stats import CONNECTIONS_REMEMBERED

    stats = Stats()
    for i in range(CONNECTIONS_REMEMBERED + 10):
        stats.request("infer", f"connection-{i}", at=float(i))
    assert len(stats._last_request) == CONNECTIONS_REMEMBERED
    stats.request("infer", "connection-0", at=1e6)  # forgotten (the oldest): no interval from it
    assert "interval_ms" not in stats.summary()["latency_ms"]


def test_the_endpoint_answers_health_and_guards_metrics_with_keys() -> None:
    state = {"live": True, "ready": False}
    metrics = Metrics("", BundleLabels("b"))
    endpoint = HttpEndpoint(
        "127.0.0.1", 0, metrics, lambda: state["live"], lambda: state["ready"], api_keys=frozenset({"s3cret"})
    )
    endpoint.start()
    try:
        base = "http://{}:{}".format(*endpoint.address)
        assert get(base + "/healthz")[0] == 200 and get(base + "/v2/health/live")[0] == 200
        assert get(base + "/readyz")[0] == 503 and get(base + "/v2/health/ready")[0] == 503
        state.update(ready=True, live=False)
        assert get(base + "/readyz")[0] == 200 and get(base + "/healthz")[0] == 503
        assert get(base + "/metrics")[0] == 401
        assert get(base + "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        status, text = get(base + "/metrics", {"Authorization": "Bearer s3cret"})
        assert status == 200 and "pi0_request_success_total" in text
        status, text = get(base + "/nothing")
        assert status == 404 and "/metrics" in text
    finally:
        endpoint.stop()


def test_metrics_off_loopback_need_keys(tmp_path: Path) -> None:
    config = {**DEFAULTS, "metrics_endpoint": "0.0.0.0:9464"}
    with pytest.raises(AuthConfigError, match="metrics_api_keys"):
        server_config(config, 14)
    keys = tmp_path / "keys"
    keys.write_text("# Prometheus' bearer token\ns3cret\n")
    settings = server_config({**config, "metrics_api_keys": str(keys)}, 14)
    assert settings.metrics == ("0.0.0.0", 9464) and settings.metrics_api_keys == {"s3cret"}
    assert server_config({**config, "allow_insecure_network": True}, 14).metrics == ("0.0.0.0", 9464)
    assert server_config({**DEFAULTS, "metrics_endpoint": "127.0.0.1:9464"}, 14).metrics == ("127.0.0.1", 9464)
    assert server_config(dict(DEFAULTS), 14).metrics is None  # off unless configured
    with pytest.raises(ConfigError, match="HOST:PORT"):
        server_config({**DEFAULTS, "metrics_endpoint": "9464"}, 14)


def test_ready_only_between_warm_up_and_drain(dummy_bundle: Path, tmp_path: Path) -> None:
    """The real server on the main thread, its engine held at gates this test opens: /readyz is 503 during
    the warm-up, 200 after it, 503 again from SIGTERM while the request in flight finishes; /healthz is 200
    throughout (nothing is stuck)."""
    from runtime.backends import BackendOptions
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.bundle.manifest import load_bundle
    from runtime.daemon.config import ServerConfig
    from runtime.daemon.server import Server
    from runtime.engine import Engine

    bundle = load_bundle(dummy_bundle)
    warm_up_may_run, request_may_finish, request_running = threading.Event(), threading.Event(), threading.Event()
    server: Server

    class GatedEngine:
        """The real engine; its warm-up waits for `warm_up_may_run`, a request after it for `request_may_finish`."""

        def __init__(self) -> None:
            self.engine = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle, BackendOptions(threads=1)))

        def __getattr__(self, name: str):
            return getattr(self.engine, name)

        def infer(self, obs, trace=None, notes=None):
            warm_up_may_run.wait(60)
            if server.warmed_up:
                request_running.set()
                request_may_finish.wait(60)
            return self.engine.infer(obs, trace, notes)

    endpoint = f"ipc://{tmp_path}/policy.sock"
    server = Server(GatedEngine, ServerConfig(endpoint=endpoint, metrics=("127.0.0.1", 0)))
    base = "http://{}:{}".format(*server.http.address)
    seen: dict[str, object] = {}

    def wait_for(path: str, status: int) -> None:
        deadline = time.monotonic() + 60
        while get(base + path)[0] != status:
            assert time.monotonic() < deadline, f"{path} never answered {status}"
            time.sleep(0.02)

    def robot_side() -> None:
        try:
            wait_for("/healthz", 200)
            seen["readyz while warming up"] = get(base + "/readyz")[0]
            warm_up_may_run.set()
            wait_for("/readyz", 200)
            seen["readyz when warm"] = 200
            reply: dict = {}
            with PolicyClient(endpoint, timeout_s=60) as client:
                caller = threading.Thread(
                    target=lambda: reply.update(client.infer(observation_for(dummy_bundle, "go")))
                )
                caller.start()
                assert request_running.wait(60)
                os.kill(os.getpid(), signal.SIGTERM)
                wait_for("/readyz", 503)
                seen["readyz while draining"] = 503
                seen["healthz while draining"] = get(base + "/healthz")[0]
                request_may_finish.set()
                caller.join(60)
            seen["actions"] = reply["actions"].shape
        except BaseException as e:  # kept, to be raised again on the test's thread
            seen["error"] = e
            warm_up_may_run.set()
            request_may_finish.set()
            os.kill(os.getpid(), signal.SIGTERM)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    checks = threading.Thread(target=robot_side)
    checks.start()
    try:
        assert server.serve() == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        checks.join(60)
    if "error" in seen:
        raise seen["error"]
    assert seen == {
        "readyz while warming up": 503,
        "readyz when warm": 200,
        "readyz while draining": 503,
        "healthz while draining": 200,
        "actions": (50, 14),
    }


@pytest.fixture
def prometheus(tmp_path: Path):
    """`prometheus(target)`: Debian's Prometheus scraping `target` (host:port) every second, on loopback,
    storing into tmp_path -> its HTTP API's base URL. Stopped at the end of the test."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make setup` installs Debian's package (apt-get install prometheus)"
    started: list[subprocess.Popen] = []

    def start(target: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs:\n  - job_name: pi0\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.terminate()
        process.wait(30)


def query(api: str, promql: str, timeout_s: float = 60.0, want: float | None = None) -> float:
    """The value of an instant PromQL query with one result, polled until Prometheus has it (and, with
    `want`, until it equals that: the next scrape brings the newest counts)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = get(f"{api}/api/v1/query?query={urllib.parse.quote(promql)}")
        except OSError:  # not listening yet, or a connection reset or timed out while it starts
            status, body = 0, ""
        if status == 200:
            result = json.loads(body)["data"]["result"]
            if len(result) == 1:
                last = float(result[0]["value"][1])
                if want is None or last == want:
                    return last
        time.sleep(0.25)
    raise AssertionError(f"Prometheus never answered {promql!r} with {want} (last: {last})")


def test_a_real_prometheus_scrapes_the_daemon(dummy_bundle: Path, start_daemon, prometheus, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "runtime.toml"
    config.write_text(f'metrics_endpoint = "127.0.0.1:{port}"\nrobot = "arm-7"\n')
    daemon = start_daemon(dummy_bundle, "--config", str(config))
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        for _ in range(3):
            assert client.infer(observation_for(dummy_bundle, "pick up the cube"))["actions"].shape == (50, 14)
        with pytest.raises(PolicyError, match=r"bad_request|state"):
            client.infer({**observation_for(dummy_bundle, "pick up the cube"), "observation.state": [1.0]})
    api = prometheus(f"127.0.0.1:{port}")
    mine = '{job="pi0", robot="arm-7"}'
    assert query(api, 'up{job="pi0"}', want=1) == 1
    assert query(api, f"pi0_request_success_total{mine}", want=3) == 3
    assert query(api, 'pi0_request_failure_total{job="pi0", reason="bad_request"}', want=1) == 1
    assert query(api, f"pi0_request_duration_seconds_count{mine}", want=3) == 3
    median = query(api, f"histogram_quantile(0.5, pi0_request_duration_seconds_bucket{mine})")
    assert 0 < median < 10  # within the buckets; a histogram Prometheus can compute quantiles from
    assert query(api, f"pi0_ready{mine}", want=1) == 1
    # The dummy's statistics put this state out of range: served with a warning, each counted (the refused
    # request never reached the guard).
    assert query(api, 'pi0_request_warnings_total{job="pi0", kind="out_of_range_warnings"}', want=3) == 3
    assert query(api, 'process_resident_memory_bytes{job="pi0"}') > 0
    assert daemon.stop() == 0

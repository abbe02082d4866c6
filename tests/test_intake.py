"""Hostile and broken clients against the real daemon (pi0-dummy bundle): an oversized frame, too many
frames, a flood of connections with malformed requests. In each: the daemon's peak RSS stays within its
stated budget (its RSS after start + what `runtime.daemon.intake` says requests may hold), it keeps serving a
legitimate client throughout, RSS returns to within 20% of its level before, and the log holds at most
one line per refusal kind per interval. `pytest -s` prints the figures docs/reliability.md quotes."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import observation_for

from devtools.supervise import Daemon
from pi0_client import protocol
from pi0_client.client import ConnectionDroppedError, PolicyClient, RequestTooLargeError
from pi0_client.metadata import Camera, Metadata, PromptInfo
from runtime.backends import capabilities
from runtime.daemon.intake import (
    REQUEST_FRAMES,
    Intake,
    MemoryBoundError,
    camera_frame_limit,
    cgroup_memory_max,
    check_memory_for,
)
from runtime.daemon.refusals import RefusalLog
from runtime.daemon.stats import summarize

MiB = 2**20
LOG_INTERVAL_S = 1.0


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Served:
    daemon: Daemon
    intake: Intake
    baseline: float  # RSS (MiB) after start and a first request
    obs: dict  # a legitimate request


@pytest.fixture
def served(dummy_bundle: Path, start_daemon, tmp_path: Path) -> Served:
    config = tmp_path / "runtime.toml"
    config.write_text(f"log_interval_s = {LOG_INTERVAL_S}\n")
    daemon = start_daemon(dummy_bundle, "--config", str(config))
    obs = observation_for(dummy_bundle, "transfer the cube")
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        meta = client.metadata()
        client.infer(obs)  # the first inference's allocations belong to the baseline
    baseline = rss_mib(daemon.process.pid)
    reset_peak(daemon.process.pid)
    return Served(daemon, Intake(meta.max_frame_bytes, meta.max_request_bytes, 4), baseline, obs)


class Legitimate:
    """A controller that keeps asking for actions while the hostile client does its thing."""

    def __init__(self, endpoint: str, obs: dict) -> None:
        self.endpoint, self.obs = endpoint, obs
        self.latencies: list[float] = []
        self.errors: list[Exception] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with PolicyClient(self.endpoint, timeout_s=30, retries=0) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    assert np.isfinite(client.infer(self.obs)["actions"]).all()
                    self.latencies.append((time.perf_counter() - start) * 1e3)
                except Exception as e:  # reported by the test
                    self.errors.append(e)

    def __enter__(self) -> Legitimate:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def check_bounded(served: Served, legit: Legitimate, case: str) -> None:
    pid, baseline = served.daemon.process.pid, served.baseline
    peak = rss_mib(pid, "VmHWM")
    budget = baseline + served.intake.budget_bytes / MiB
    time.sleep(1.0)  # what a burst took is given back within a second
    after = rss_mib(pid)
    p50 = summarize(legit.latencies).get("p50", float("nan"))
    print(
        f"\n{case}: RSS before {baseline:.0f} MiB, peak {peak:.0f} MiB (budget {budget:.0f}), after {after:.0f} MiB; "
        f"legitimate client: {len(legit.latencies)} chunks, p50 {p50:.1f} ms, {len(legit.errors)} errors"
    )
    assert peak < budget, f"peak RSS {peak:.0f} MiB over the budget {budget:.0f} MiB"
    assert after <= 1.2 * baseline, f"RSS {after:.0f} MiB did not return to within 20% of {baseline:.0f} MiB"
    assert not legit.errors and legit.latencies, legit.errors[:3]


def test_an_oversized_frame_drops_the_connection_before_it_is_allocated(served: Served) -> None:
    huge = np.zeros(3 * 2**29, np.uint8)  # 1.5 GiB of untouched zero pages on this side
    naive = PolicyClient(served.daemon.endpoint, timeout_s=3, retries=0)  # does not know the limits
    dropped = pytest.raises(ConnectionDroppedError, match="closed the connection without replying")
    with Legitimate(served.daemon.endpoint, served.obs) as legit, naive, dropped:
        naive.request("infer", {}, {"observation.images.top": huge})
    check_bounded(served, legit, "one 1.5 GiB frame")
    with PolicyClient(served.daemon.endpoint, timeout_s=3, retries=0) as informed:
        informed.metadata()
        with pytest.raises(RequestTooLargeError, match="max_frame_bytes"):  # refused before sending
            informed.request("infer", {}, {"observation.images.top": huge[: served.intake.max_frame_bytes + 1]})


def test_too_many_frames(served: Served) -> None:
    daemon = served.daemon
    header = protocol.wire.pack({"v": 1, "kind": "infer", "id": 1, "arrays": []})
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    with Legitimate(daemon.endpoint, served.obs) as legit:
        # 60 frames of 20 MB (1.2 GB): the first is over the frame limit, so the connection goes.
        sock.send_multipart([header, *[np.zeros(20_000_000, np.uint8)] * 60], copy=False)
        assert not sock.poll(2000)
        sock.close(linger=0)
        # 2,000 tiny frames: read one by one, all but a request's worth released, and answered.
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.endpoint)
        sock.send_multipart([header, *[b"x"] * 2000])
        assert sock.poll(10_000)
        reply, _ = protocol.decode(sock.recv_multipart())
        assert reply["error"]["code"] == "bad_request" and f"at most {REQUEST_FRAMES}" in reply["error"]["message"]
    sock.close(linger=0)
    check_bounded(served, legit, "60 x 20 MB frames, then 2,000 frames")


def test_a_flood_of_connections_is_answered_and_summarized_not_logged_line_by_line(served: Served) -> None:
    daemon = served.daemon
    n = 1500
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, n + 16)  # libzmq's default is 1023 sockets per context
    start = time.monotonic()
    with Legitimate(daemon.endpoint, served.obs) as legit:
        sockets = []
        for _ in range(n):
            sock = context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(daemon.endpoint)
            sock.send(b"\xc1")  # not msgpack
            sockets.append(sock)
        answered = 0
        for sock in sockets:
            if sock.poll(30_000):
                reply, _ = protocol.decode(sock.recv_multipart())
                answered += reply["error"]["code"] == "bad_request"
            sock.close(linger=0)
    elapsed = time.monotonic() - start
    context.term()
    assert answered == n
    time.sleep(LOG_INTERVAL_S + 0.5)  # let the last interval's summary come
    lines = [line for line in daemon.log().splitlines() if "refused" in line]
    print(f"\n{n} malformed requests in {elapsed:.1f} s: {len(lines)} log lines")
    print("\n".join(lines[:3]))
    intervals = int(elapsed / LOG_INTERVAL_S) + 2
    assert len(lines) <= intervals, f"{len(lines)} refusal lines for {intervals} intervals"
    assert "request None refused (bad_request)" in lines[0]  # the first in full
    summaries = [line for line in lines if "more bad_request" in line]
    assert sum(int(line.split("refused ")[1].split()[0]) for line in summaries) == n - 1  # every one counted
    check_bounded(served, legit, f"{n} connections, one malformed message each")


# --- the pieces alone ---------------------------------------------------------------------------------


def test_refusals_log_the_first_in_full_then_one_summary_per_kind_per_interval(caplog) -> None:
    now = [0.0]
    refusals = RefusalLog(interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="pi0-runtime"):
        for i in range(1000):  # a flood of two kinds over 25 s
            now[0] = i * 0.025
            refusals.record("bad_request", i, f"malformed {i}", connection=i, address="10.0.0.9")
            refusals.record("busy", i, "queue full", connection=0, address="10.0.0.8")
        now[0] = 40.0
        refusals.flush()  # the last interval's summary, after the flood
        lines = [r.getMessage() for r in caplog.records]
    assert (
        lines[0] == "request 0 refused (bad_request): malformed 0"
        and lines[1] == "request 0 refused (busy): queue full"
    )
    summaries = [line for line in lines[2:] if line.startswith("refused")]
    assert len(summaries) == len(lines) - 2 == 6  # 3 intervals x 2 kinds
    assert sum(int(line.split()[1]) for line in summaries if "bad_request" in line) == 999
    assert summaries[0].endswith(
        "more bad_request in the last 10 s from 399 connection(s), 1 address(es); latest: malformed 399"
    )
    with caplog.at_level(logging.WARNING, logger="pi0-runtime"):
        now[0] = 60.0  # quiet for a whole interval: the next one is logged in full again
        refusals.record("busy", 7, "queue full")
    assert caplog.records[-1].getMessage() == "request 7 refused (busy): queue full"


def test_the_frame_limit_follows_the_bundles_cameras() -> None:
    def meta(*shapes: tuple[int, int, int]) -> Metadata:
        cameras = tuple(Camera(f"c{i}", s) for i, s in enumerate(shapes))
        return Metadata(cameras, 14, 14, 50, PromptInfo(48, True), "onnxruntime", "test")

    assert camera_frame_limit(meta((3, 480, 640))) == 1080 * 1920 * 3 + 2**20  # full HD at least
    assert camera_frame_limit(meta((3, 480, 640), (3, 1080, 1440))) == 2160 * 2880 * 3 + 2**20  # twice the largest
    intake = Intake.for_metadata(meta((3, 480, 640), (3, 480, 640)), queue_size=4)
    assert intake.max_request_bytes == 2 * intake.max_frame_bytes + 2**20
    assert intake.budget_bytes == 5 * intake.max_request_bytes + REQUEST_FRAMES * intake.max_frame_bytes
    assert Intake.for_metadata(meta((3, 480, 640)), 4, max_frame_bytes=1000).max_frame_bytes == 1000


def test_a_memory_bound_the_weights_cannot_fit_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "cgroup").write_text("0::/system.slice/pi0-runtime.service\n")
    unit = tmp_path / "sys" / "system.slice" / "pi0-runtime.service"
    unit.mkdir(parents=True)
    (unit / "memory.max").write_text(f"{4 * 2**30}\n")
    limit = cgroup_memory_max(tmp_path / "cgroup", tmp_path / "sys")
    assert limit == 4 * 2**30
    cpu, npu = capabilities("onnxruntime"), capabilities("acl")  # what each backend declares
    check_memory_for(2 * 2**30, "onnxruntime", cpu, limit)  # fits
    check_memory_for(7 * 2**30, "acl", npu, limit)  # on the NPU the weights are not in RAM
    with pytest.raises(
        MemoryBoundError, match=r"onnxruntime backend .* 7.0 GiB of weights .* 4.0 GiB \(MemoryMax=\); raise it"
    ):
        check_memory_for(7 * 2**30, "onnxruntime", cpu, limit)
    (unit / "memory.max").write_text("max\n")
    assert cgroup_memory_max(tmp_path / "cgroup", tmp_path / "sys") is None

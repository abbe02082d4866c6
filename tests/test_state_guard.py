"""The state guard (runtime/daemon/state_guard.py): each request's normalized state held to the training
statistics. The check alone (mean_std and quantile statistics, the fixtures' golden states, a state in
degrees, a state normalized twice where that is detectable and where it is not), its settings, and through
the real daemon: warn (actions + a `state_out_of_range` field, `StateOutOfRangeWarning` in the client, the
websocket reply's extra key, counted, summarized in the log) and refuse (`out_of_range`, counted)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, free_port

from exporter.presets import preset_spec
from pi0_client import PolicyClient, PolicyError, StateOutOfRangeWarning
from runtime.bundle.conventions import LEROBOT_03
from runtime.bundle.spec import NormStats, PolicySpec
from runtime.daemon import openpi_compat
from runtime.daemon.config import load_config, server_config
from runtime.daemon.limits import LimitsConfigError
from runtime.daemon.refusals import RefusalLog
from runtime.daemon.state_guard import StateGuard, StateRangeSettings

DEG = np.float32(180 / np.pi)  # 57.2958: radians -> degrees
PROMPT = "transfer the cube"
# gym-aloha's START_ARM_POSE as the 14-dim state (6 joints + the gripper, normalized to [0, 1], per arm): where
# every transfer-cube episode of the sim begins, so a state the pi0-dummy statistics were computed on.
START_POSE = np.array([0, -0.96, 1.16, 0, -0.3, 0, 0.1, 0, -0.96, 1.16, 0, -0.3, 0, 0.1], np.float32)
ALOHA_FLIPPED = (1, 2, 8, 9)  # joints ALOHA reports with pi0's opposite sign (negated before normalization)


def small_spec(state_norm: NormStats, dim: int) -> PolicySpec:
    """A policy without ALOHA's adapter: its model state is exactly the normalized raw state."""
    return PolicySpec(
        conventions=LEROBOT_03.name,
        camera_keys=("observation.images.top",),
        camera_shapes=((3, 8, 8),),
        empty_cameras=0,
        image_size=(8, 8),
        state_dim=dim,
        action_dim=dim,
        max_state_dim=32,
        max_action_dim=32,
        chunk_size=4,
        num_steps=1,
        tokenizer_max_length=8,
        adapt_to_pi_aloha=False,
        state_norm=state_norm,
    )


def flagged(report: dict | None) -> list[int]:
    return [] if report is None else [d["index"] for d in report["dims"]]


_SPECS: dict[str, PolicySpec] = {}


def fixture_spec(name: str) -> PolicySpec:
    """A fixture checkpoint's spec as the exporter reads it (loaded once per test session)."""
    from exporter.checkpoint import load_checkpoint

    options = {  # as tests/test_openpi.py loads them: ALOHA's adapter, the training configs' token lengths
        "openpi-pi0-tiny": {"openpi_config": "pi0_aloha_sim", "max_token_len": 16},
        "openpi-pi05-tiny": {"openpi_config": "pi0_aloha_sim", "max_token_len": 80},
    }.get(name, {})
    if name not in _SPECS:
        _SPECS[name] = load_checkpoint(FIXTURES / name / "checkpoint", **options).spec
    return _SPECS[name]


def golden_state(name: str) -> np.ndarray:
    return np.load(FIXTURES / name / "golden.npz", allow_pickle=False)["state"][0]


# --- the check ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("lerobot04-pi0-tiny", "mean_std"),
        ("openpi-pi0-tiny", "mean_std"),  # ALOHA's adapter; its golden state reaches |z| 4.2 (dims 5, 10)
        ("lerobot04-pi05-tiny", "quantiles"),
        ("openpi-pi05-tiny", "quantiles"),  # reaches 2.14 (dim 5): beyond q99, inside the margin
    ],
)
def test_the_fixtures_golden_states_pass(name: str, mode: str) -> None:
    spec = fixture_spec(name)
    assert spec.state_norm.mode == mode and spec.adapt_to_pi_aloha == name.startswith("openpi")
    assert StateGuard(spec, StateRangeSettings()).check(golden_state(name)) is None


def test_the_sims_start_pose_passes_the_real_statistics() -> None:
    """pi0-dummy's statistics are the scripted transfer-cube demonstrations' (exporter/assets)."""
    assert StateGuard(preset_spec(), StateRangeSettings()).check(START_POSE) is None


def test_a_state_in_degrees_is_flagged_on_the_joints_away_from_zero() -> None:
    spec = preset_spec()
    degrees = START_POSE * DEG
    report = StateGuard(spec, StateRangeSettings()).check(degrees)
    # The joints at 0 rad are at 0 degrees too (dims 0, 3, 5, 7, 10, 12); the grippers are clipped by
    # ALOHA's gripper conversion (dims 6, 13); every other joint lands far out.
    assert flagged(report) == [1, 2, 4, 8, 9, 11]
    assert report["count"] == 6 and report["action"] == "warn" and report["norm"] == "mean_std"
    mean, std = spec.state_norm.mean, spec.state_norm.std
    for d in report["dims"]:
        i = d["index"]
        sign = -1.0 if i in ALOHA_FLIPPED else 1.0
        assert d["value"] == pytest.approx(float(degrees[i]))  # in the robot's units, as sent
        assert d["normalized"] == pytest.approx((sign * degrees[i] - mean[i]) / std[i], rel=1e-4)
        assert d["bound"] == 10.0 and abs(d["normalized"]) > 10
    assert report["dims"][0]["normalized"] == pytest.approx(104.27, abs=0.01)  # dim 1: -0.96 rad = -55.0 deg


def test_a_state_in_degrees_on_the_lerobot04_fixture() -> None:
    spec, state = fixture_spec("lerobot04-pi0-tiny"), golden_state("lerobot04-pi0-tiny")
    stats = spec.state_norm
    z = (state * DEG - stats.mean[:7]) / (stats.std[:7] + stats.eps)  # by hand: mean_std, no adapter
    want = [i for i in range(7) if abs(z[i]) > 10]
    report = StateGuard(spec, StateRangeSettings()).check(state * DEG)
    assert want and flagged(report) == want
    np.testing.assert_allclose([d["normalized"] for d in report["dims"]], z[want], rtol=1e-5)


def test_a_state_normalized_twice_is_flagged_where_the_statistics_show_it() -> None:
    """The client normalizes its state, the daemon again: z2 = (z1 - mean) / std lands near -mean/std with
    a spread of 1/std. With the sim's real statistics several dimensions have |mean|/std or 1/std far above
    the bound (dim 0: std 0.004 rad, the waist barely moves; dim 3: mean -0.021, std 0.019)."""
    spec = preset_spec()
    mean, std = spec.state_norm.mean[:14], spec.state_norm.std[:14]
    once = ((START_POSE - mean) / std).astype(np.float32)  # what a client that normalizes itself sends
    report = StateGuard(spec, StateRangeSettings()).check(once)
    sign = np.where(np.isin(np.arange(14), ALOHA_FLIPPED), -1.0, 1.0)
    twice = (sign * once - mean) / std  # by hand, for the joints (grippers go through ALOHA's conversion)
    joints = [i for i in range(14) if i not in (6, 13)]
    assert flagged(report) == [i for i in joints if abs(twice[i]) > 10] == [0, 2, 3, 9, 11]
    got = {d["index"]: d["normalized"] for d in report["dims"]}
    assert got[0] == pytest.approx(twice[0], rel=1e-4) and got[0] > 400


def test_a_state_normalized_twice_is_invisible_with_statistics_near_mean_0_std_1() -> None:
    """What the guard cannot catch, stated as a test: where mean ~ 0 and std ~ 1, normalizing again barely
    changes the state, so a doubly normalized state looks like a raw one."""
    stats = NormStats(mean=[0.05, -0.1, 0.0, 0.2], std=[1.1, 0.9, 1.0, 1.2], eps=1e-8)
    raw = np.array([1.5, -1.2, 0.7, -2.0], np.float32)
    once = (raw - stats.mean) / stats.std
    guard = StateGuard(small_spec(stats, 4), StateRangeSettings())
    assert guard.check(raw) is None and guard.check(once.astype(np.float32)) is None

    # The lerobot04 fixture's statistics (mean/std between -1.3 and 1.8): its golden state normalized twice
    # stays within |z| 6.6 (by hand: dim 6, (-1.331 - 0.523) / 0.284 = -6.5).
    spec, state = fixture_spec("lerobot04-pi0-tiny"), golden_state("lerobot04-pi0-tiny")
    once = (state - spec.state_norm.mean[:7]) / spec.state_norm.std[:7]
    assert StateGuard(spec, StateRangeSettings()).check(once.astype(np.float32)) is None


def test_the_mean_std_bound_is_a_z_score() -> None:
    stats = NormStats(mean=[1.0, -2.0, 0.0], std=[0.5, 0.1, 2.0], eps=1e-8)
    guard = StateGuard(small_spec(stats, 3), StateRangeSettings(max_z=10.0))
    inside = np.array([1.0 + 9.9 * 0.5, -2.0 - 9.9 * 0.1, 0.0 + 9.9 * 2.0], np.float32)
    assert guard.check(inside) is None
    outside = np.array([1.0 + 10.2 * 0.5, -2.0, 0.0 - 10.2 * 2.0], np.float32)
    report = guard.check(outside)
    assert flagged(report) == [0, 2]
    assert [round(d["normalized"], 3) for d in report["dims"]] == [10.2, -10.2]
    assert flagged(StateGuard(small_spec(stats, 3), StateRangeSettings(max_z=11.0)).check(outside)) == []


def test_quantile_statistics_get_a_margin_beyond_minus_one_to_one() -> None:
    """(x - q01) / (q99 - q01) * 2 - 1 maps q01..q99 to [-1, 1]; the default margin 3 bounds |v| at 4."""
    stats = NormStats(mode="quantiles", q01=[-1.0, 0.0, 0.5], q99=[1.0, 2.0, 0.6], eps=1e-8, eps_rule="lerobot")
    guard = StateGuard(small_spec(stats, 3), StateRangeSettings())
    assert guard.bound == 4.0
    assert guard.check(np.array([0.5, 3.9, 0.55], np.float32)) is None  # v = 0.5, 2.9, 0
    report = guard.check(np.array([2.6, 5.1, 0.3], np.float32))  # v = 3.6, 4.1, -5
    assert flagged(report) == [1, 2] and report["norm"] == "quantiles"
    np.testing.assert_allclose([d["normalized"] for d in report["dims"]], [4.1, -5.0], rtol=1e-5)
    assert all(d["bound"] == 4.0 for d in report["dims"])


def test_a_state_in_degrees_on_the_quantile_fixture() -> None:
    spec, state = fixture_spec("lerobot04-pi05-tiny"), golden_state("lerobot04-pi05-tiny")
    lo, hi = spec.state_norm.q01[:7], spec.state_norm.q99[:7]
    v = 2 * (state * DEG - lo) / (hi - lo) - 1  # by hand: LeRobot's quantile rule
    want = [i for i in range(7) if abs(v[i]) > 4]
    report = StateGuard(spec, StateRangeSettings()).check(state * DEG)
    assert want and flagged(report) == want
    np.testing.assert_allclose([d["normalized"] for d in report["dims"]], v[want], rtol=1e-5)


def test_constant_and_ignored_dimensions_are_not_checked() -> None:
    """A dimension that never moved in training (std 0) normalizes by eps alone: any value is "far out",
    which says nothing about the state; it is skipped, as are the ones the config lists."""
    stats = NormStats(mean=[0.0, 0.3, 0.0], std=[1.0, 0.0, 1.0], eps=1e-8)
    spec = small_spec(stats, 3)
    state = np.array([0.0, 0.31, 50.0], np.float32)
    assert flagged(StateGuard(spec, StateRangeSettings()).check(state)) == [2]
    assert StateGuard(spec, StateRangeSettings(ignore=(2,))).check(state) is None
    with pytest.raises(LimitsConfigError, match="state_ignore"):
        StateGuard(spec, StateRangeSettings(ignore=(3,)))


def test_a_state_the_engine_refuses_is_left_to_the_engine() -> None:
    guard = StateGuard(preset_spec(), StateRangeSettings())
    for state in (START_POSE[:7] * DEG, (START_POSE * DEG).astype(np.int32), np.full(14, np.nan, np.float32)):
        assert guard.check(state) is None


def test_a_report_lists_16_dimensions_and_counts_them_all() -> None:
    stats = NormStats(mean=np.zeros(20), std=np.ones(20), eps=1e-8)
    report = StateGuard(small_spec(stats, 20), StateRangeSettings()).check(np.full(20, 50.0, np.float32))
    assert report["count"] == 20 and flagged(report) == list(range(16))


# --- settings ----------------------------------------------------------------------------------------


def test_settings_from_the_config_file(tmp_path: Path) -> None:
    assert server_config(load_config(None), 14).state_range == StateRangeSettings(mode="warn", max_z=10.0)
    config = tmp_path / "runtime.toml"
    config.write_text(
        '[limits]\nout_of_range = "refuse"\nstate_max_z = 6\nstate_quantile_margin = 1.5\nstate_ignore = [3, 1]\n'
        "joint_max = [1.0, 1.0]\n"
    )
    settings = server_config(load_config(config), 2)
    assert settings.state_range == StateRangeSettings("refuse", 6.0, 1.5, (1, 3))
    assert settings.limits.joint_max.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"out_of_range": "ignore"}, "out_of_range must be one of"),
        ({"state_max_z": 0}, "state_max_z must be a positive number"),
        ({"state_max_z": True}, "state_max_z must be a positive number"),
        ({"state_quantile_margin": -1.0}, "state_quantile_margin must be a positive number"),
        ({"state_ignore": [1.5]}, "state_ignore must be a list"),
        ({"state_max": 5}, "unknown \\[limits\\] settings \\['state_max'\\]; known:"),
    ],
)
def test_bad_state_settings_are_refused(table: dict, message: str) -> None:
    config = load_config(None)
    with pytest.raises(LimitsConfigError, match=message):
        server_config({**config, "limits": table}, 14)


def test_off_and_policies_without_statistics_have_no_guard() -> None:
    class Oracle:  # the sim's scripted oracle: no PolicySpec
        pass

    class Served:
        spec = preset_spec()

    assert StateGuard.for_engine(Served(), StateRangeSettings(mode="off")) is None
    assert StateGuard.for_engine(Oracle(), StateRangeSettings()) is None
    assert StateGuard.for_engine(Served(), StateRangeSettings()) is not None


# --- logging, the websocket reply --------------------------------------------------------------------


def test_warnings_are_logged_like_refusals_first_in_full_then_per_interval(caplog) -> None:
    now = [0.0]
    log = RefusalLog(interval_s=10, clock=lambda: now[0], verb="warned")
    with caplog.at_level(logging.WARNING, logger="pi0-runtime"):
        for i in range(50):  # one every 0.25 s for 12.5 s
            now[0] = i * 0.25
            log.record("state_out_of_range", i, f"dim 1 = {i}", connection=7, address="10.0.0.9")
        now[0] = 20.0
        log.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "request 0 warned (state_out_of_range): dim 1 = 0"
    assert lines[1].startswith("warned 39 more state_out_of_range in the last 10 s from 1 connection(s)")
    assert lines[2].startswith("warned 10 more state_out_of_range in the last 10 s") and lines[2].endswith("dim 1 = 49")
    assert len(lines) == 3 and not any("refused" in line for line in lines)


def test_the_openpi_reply_carries_the_warning_as_an_extra_key() -> None:
    report = {"action": "warn", "norm": "mean_std", "bound": 10.0, "count": 0, "dims": []}
    header = {"timing": {"total_ms": 5.0}, "state_out_of_range": report}
    out = openpi_compat.reply(header, {"actions": np.zeros((2, 3), np.float32)}, 6.0)
    assert out["state_out_of_range"] == report
    assert "state_out_of_range" not in openpi_compat.reply({"timing": {"total_ms": 5.0}}, {"actions": None}, 6.0)


# --- through the daemon -------------------------------------------------------------------------------


def request(state: np.ndarray) -> dict:
    """A request for the pi0-dummy bundle: its one camera, the state, its fixed prompt."""
    return {
        "observation.images.top": np.zeros((480, 640, 3), np.uint8),
        "observation.state": state,
        "prompt": PROMPT,
        "seed": 3,
    }


def test_warn_serves_the_actions_and_names_the_dimensions(dummy_bundle: Path, tmp_path: Path, start_daemon) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    config = tmp_path / "runtime.toml"
    config.write_text('log_interval_s = 1.0\n[limits]\nout_of_range = "warn"\n')
    port = free_port()
    daemon = start_daemon(dummy_bundle, "--config", str(config), "--websocket", f"127.0.0.1:{port}")
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fine = client.infer(request(START_POSE))
        assert not [w for w in caught if issubclass(w.category, StateOutOfRangeWarning)]
        assert "state_out_of_range" not in fine
        for _ in range(3):
            with pytest.warns(StateOutOfRangeWarning, match="dim 1 = -55") as caught:
                result = client.infer(request(START_POSE * DEG))
            assert result["actions"].shape == (50, 14) and np.isfinite(result["actions"]).all()
            warning = next(w.message for w in caught if issubclass(w.category, StateOutOfRangeWarning))
            assert [d["index"] for d in warning.dims] == [1, 2, 4, 8, 9, 11]
            assert warning.dims[0]["value"] == pytest.approx(-0.96 * DEG) and warning.dims[0]["bound"] == 10.0
            assert result["state_out_of_range"]["count"] == 6
        openpi = WebsocketClientPolicy("127.0.0.1", port).infer(
            {"images": {"cam_high": np.zeros((3, 480, 640), np.uint8)}, "state": START_POSE * DEG, "prompt": PROMPT}
        )
        assert openpi["actions"].shape == (50, 14)
        assert [d["index"] for d in openpi["state_out_of_range"]["dims"]] == [1, 2, 4, 8, 9, 11]
        counts = client.stats()["counts"]
    assert counts["out_of_range_warnings"] == 4 and counts["ok"] == 5 and "out_of_range" not in counts
    time.sleep(1.5)  # the interval's summary
    lines = [line for line in daemon.log().splitlines() if "state_out_of_range" in line]
    full = [line for line in lines if "warned (state_out_of_range)" in line]
    summaries = [int(line.split("warned ")[1].split()[0]) for line in lines if "more state_out_of_range" in line]
    assert full and len(full) + sum(summaries) == 4, lines
    assert len(lines) < 4 and not any("refused" in line for line in lines)
    assert "state range: warn beyond |z| 10 (mean_std statistics)" in daemon.log()


def test_refuse_sends_nothing_and_counts_the_refusal(dummy_bundle: Path, tmp_path: Path, start_daemon) -> None:
    config = tmp_path / "runtime.toml"
    config.write_text('[limits]\nout_of_range = "refuse"\n')
    daemon = start_daemon(dummy_bundle, "--config", str(config))
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        assert client.infer(request(START_POSE))["actions"].shape == (50, 14)
        with pytest.raises(PolicyError) as refused:
            client.infer(request(START_POSE * DEG))
        counts = client.stats()["counts"]
    assert refused.value.code == "out_of_range"
    assert "dim 1 = -55" in refused.value.message and "dim 11 = -17.19" in refused.value.message
    assert counts["out_of_range"] == 1 and counts["ok"] == 1 and "out_of_range_warnings" not in counts
    assert "refused (out_of_range)" in daemon.log()

"""`pi0-export` as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

EXE = shutil.which("pi0-export", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess:
    assert EXE, "pi0-export is not installed in this environment (make setup installs it)"
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


def test_help_explains_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0 and "inspect" in out.stdout and "sample" in out.stdout
    sample = run("sample", "--help")
    for option in ("--checkpoint", "--preset", "--prompt", "--tokenizer", "--seed"):
        assert option in sample.stdout


def test_sample_preset_prints_a_finite_chunk() -> None:
    out = run("sample", "--preset", "pi0-dummy", "--prompt", "transfer the cube", "--rows", "50")
    assert out.returncode == 0, out.stderr
    assert "first 50 of 50 actions (14 dims each)" in out.stdout
    assert "ready in" in out.stderr and "action chunk (50, 14)" in out.stderr
    body = out.stdout.split("each):", 1)[1].replace("[", " ").replace("]", " ")
    values = np.array(body.split(), dtype=float)
    assert values.shape == (50 * 14,) and np.isfinite(values).all() and np.abs(values).max() > 0


def test_inspect_fixture() -> None:
    out = run("inspect", "--checkpoint", str(FIXTURES / "lerobot-pi0-tiny" / "checkpoint"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["framework"], report["model_type"], report["conventions"]["name"]) == (
        "lerobot",
        "pi0",
        "lerobot-0.3",
    )
    assert report["dims"]["language"] == {
        "width": 64,
        "depth": 4,
        "mlp_dim": 128,
        "num_heads": 8,
        "head_dim": 16,
        "num_kv_heads": 1,
    }
    assert report["spec"]["camera_keys"] == ["observation.images.top", "observation.images.wrist"]


@pytest.mark.parametrize(
    "args,message",
    [
        (("inspect", "--checkpoint", "/nonexistent"), "checkpoint directory not found"),
        (("sample", "--checkpoint", str(FIXTURES)), "neither a LeRobot pi0/pi05 checkpoint"),
    ],
)
def test_errors_are_one_clear_line(args: tuple[str, ...], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr

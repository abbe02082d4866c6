"""`pi0-export` as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

from exporter.cli import main as pi0_export

EXE = shutil.which("pi0-export", path=str(Path(sys.executable).parent))
TINY = FIXTURES / "lerobot-pi0-tiny"


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


# Each command with each path it reads: {missing} does not exist, {out} is the bundle to write.
MISSING_PATHS = [
    ("inspect", "--checkpoint", "{missing}"),
    ("sample", "--checkpoint", "{missing}"),
    ("sample", "--preset", "pi0-dummy", "--tokenizer", "{missing}"),
    ("bundle", "--checkpoint", "{missing}", "--out", "{out}"),
    ("bundle", "--preset", "pi0-dummy", "--out", "{out}", "--tokenizer", "{missing}"),
    ("bundle", "--preset", "pi0-dummy", "--out", "{out}", "--calibration", "{missing}"),
]


def test_every_command_is_tried_on_a_missing_path() -> None:
    commands = re.search(r"\{([\w,-]+)\}", run("--help").stdout)
    assert commands and set(commands.group(1).split(",")) == {args[0] for args in MISSING_PATHS}


@pytest.mark.parametrize("args", MISSING_PATHS, ids=" ".join)
def test_a_missing_path_is_one_line_naming_it(args: tuple[str, ...], tmp_path: Path, capsys) -> None:
    """In this process (`exporter.cli.main`, what the console script calls: a process per case would
    cost seconds of imports each); `test_the_console_script_exits_2_on_a_mistake` runs the script."""
    missing, bundle = tmp_path / "missing", tmp_path / "bundle"
    status = pi0_export([arg.format(missing=missing, out=bundle) for arg in args])
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert status == 2 and len(lines) == 1 and "error:" in lines[0] and str(missing) in lines[0], out.err
    assert not out.out and not bundle.exists()


@pytest.mark.parametrize(
    "args,message",
    [  # a directory or a file that is not a checkpoint; flag values out of range
        (("sample", "--checkpoint", str(FIXTURES)), f"{FIXTURES} is neither a LeRobot pi0/pi05 checkpoint"),
        (("inspect", "--checkpoint", str(TINY / "golden.npz")), f"{TINY / 'golden.npz'} is not a directory"),
        (
            ("bundle", "--preset", "pi0-dummy", "--out", "{out}", "--num-steps", "0"),
            "--num-steps must be positive, not 0",
        ),
        (("inspect", "--checkpoint", str(TINY / "checkpoint"), "--action-horizon", "-1"), "--action-horizon must be"),
    ],
)
def test_errors_are_one_clear_line(args: tuple[str, ...], message: str, tmp_path: Path, capsys) -> None:
    status = pi0_export([arg.format(out=tmp_path / "bundle") for arg in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "bundle").exists()


def test_the_console_script_exits_2_on_a_mistake(tmp_path: Path) -> None:
    out = run("inspect", "--checkpoint", str(tmp_path / "missing"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(tmp_path / "missing") in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not out.stdout

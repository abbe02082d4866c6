"""`pi0-runtime`'s commands on a user's mistake: one line naming the problem, exit status 2, never a
traceback (runtime/errors.py: every error a user can act on is an ApplianceError)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import BIN

MISSING = "no-such-dir/nothing"


def run_runtime(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "pi0-runtime", *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--bundle", MISSING],
        ["serve", "--config", f"{MISSING}.toml"],
        ["infer", "--bundle", MISSING, "--obs", f"{MISSING}.npz", "--out", "actions.npy"],
        ["bench", "--bundle", MISSING],
        ["check", "--bundle", MISSING],
        ["install-bundle", MISSING, "--store", "store", "--no-restart"],
        ["rollback", "--store", MISSING, "--no-restart"],
        ["bundles", "--store", MISSING],
        ["cann-env", "--set-env", f"{MISSING}/set_env.sh"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_each_command_on_a_missing_path_says_so_in_one_line(argv: list[str], tmp_path: Path) -> None:
    result = run_runtime(*argv, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no-such-dir" in errors[0], output


def test_keygen_into_a_missing_directory_makes_it(tmp_path: Path) -> None:
    """keygen's --dir is where to write: a missing one is made (not a mistake)."""
    result = run_runtime("keygen", "robot", "--dir", "keys/new", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "keys" / "new" / "robot.key").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "--bundle", "."], "is not a bundle: manifest.json not found"),
        (["serve", "--bundle", ".", "--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
        (["serve", "--config", "bad.toml"], "bad.toml is not valid TOML"),
    ],
)
def test_wrong_formats_and_flag_values_are_one_line(argv: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("endpoint = [unclosed\n")
    result = run_runtime(*argv, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and message in output and "Traceback" not in output, output

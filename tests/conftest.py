"""Shared test fixtures: the LeRobot golden checkpoints copied from ../shared/fixtures, and helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
QUIET = {"log": lambda message: None}  # build_bundle's progress lines, silenced
GOLDEN_CHECKPOINTS = ("lerobot-pi0-tiny", "lerobot-pi0-tiny-aloha-sim")


class Golden:
    """One fixture: its checkpoint directory and the inputs/outputs LeRobot computed for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.checkpoint = FIXTURES / name / "checkpoint"
        data = np.load(FIXTURES / name / "golden.npz", allow_pickle=False)
        self.images = {k.split("::", 1)[1]: data[k][0] for k in data.files if k.startswith("image::")}
        self.state = data["state"][0]
        self.tokens = data["lang_tokens"]
        self.token_mask = data["lang_masks"]
        self.noise = data["noise"]
        self.actions_fp32 = data["actions_fp32"]
        self.actions_bf16 = data["actions_bf16"]


SYSTEM_FIXTURES = {"start_daemon", "daemon"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a daemon is a system test, wherever it lives."""
    for item in items:
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


@pytest.fixture(params=GOLDEN_CHECKPOINTS)
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(request.param)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.tokenizer_train import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def dummy_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    """The pi0-dummy preset as a validated fp32 bundle, with its tokenizer and one fixed prompt."""
    from exporter.bundle import BundleOptions, build_bundle
    from exporter.presets import build_preset

    out = tmp_path_factory.mktemp("dummy") / "bundle"
    options = BundleOptions(tokenizer=tokenizer_path, prompts=("transfer the cube",))
    build_bundle(build_preset("pi0-dummy"), out, options, **QUIET)
    return out


@pytest.fixture(scope="session")
def aloha_sim_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lerobot-pi0-tiny-aloha-sim fixture as an fp32 bundle (no tokenizer: tokens come with requests)."""
    from exporter.bundle import BundleOptions, build_bundle
    from exporter.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("aloha-sim") / "bundle"
    build_bundle(load_checkpoint(FIXTURES / "lerobot-pi0-tiny-aloha-sim" / "checkpoint"), out, BundleOptions(), **QUIET)
    return out


def altered_copy(bundle: Path, dest: Path, name: str = "vlm.onnx", at: float = 1 / 3, mask: int = 0x40) -> Path:
    """A copy of `bundle` with one byte of file `name` flipped (its manifest left as it was)."""
    shutil.copytree(bundle, dest)
    data = bytearray((dest / name).read_bytes())
    data[int(len(data) * at)] ^= mask
    (dest / name).write_bytes(bytes(data))
    return dest


def observation_for(bundle: Path, prompt: str) -> dict:
    """A synthetic request for `bundle` (frames, state) with a text prompt instead of tokens."""
    from runtime.backends import BackendOptions
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.bundle.manifest import load_bundle
    from runtime.engine import Engine
    from runtime.pipeline.observation import Observation

    loaded = load_bundle(bundle)
    obs = Observation.synthetic(
        Engine.from_bundle(loaded, OnnxRuntimeBackend(loaded, BackendOptions(threads=1))).metadata()
    )
    return {**Observation(obs.images, obs.state).to_dict(), "prompt": prompt}


@pytest.fixture
def start_daemon():
    """`start_daemon(bundle, *serve_args, ...)`: `pi0-runtime serve` in a child process, ready (READY=1)
    when returned, its log kept in a file (`log()`), stopped with SIGTERM at the end of the test."""
    from devtools.supervise import Daemon

    started: list[Daemon] = []

    def start(bundle: Path, *args: str, endpoint: str | None = None, wait_ready: bool = True, **options) -> Daemon:
        options.setdefault("watchdog_usec", 200_000)
        daemon = Daemon.serve(bundle, *args, endpoint=endpoint, quiet=True, **options)
        started.append(daemon)
        return daemon.start(wait_ready)

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(dummy_bundle: Path, start_daemon):
    """The daemon serving the pi0-dummy bundle over ipc."""
    return start_daemon(dummy_bundle)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STUBS = Path(__file__).parent / "stubs"


def ascend_tools_path(bin_dir: Path) -> str:
    """Write the stand-ins for CANN's `atc` and the driver's `npu-smi` into `bin_dir` (see tests/stubs/);
    returns PATH with `bin_dir` first."""
    import os
    import sys

    bin_dir.mkdir(exist_ok=True)
    for tool, script in (("atc", "atc.py"), ("npu-smi", "npu_smi.py")):
        exe = bin_dir / tool
        exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STUBS / script}" "$@"\n')
        exe.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture
def acl(monkeypatch: pytest.MonkeyPatch):
    """The pyACL stand-in (tests/stubs/acl.py) as `import acl`, fresh for one test."""
    import sys

    monkeypatch.syspath_prepend(str(STUBS))
    sys.modules.pop("acl", None)
    import acl as stand_in

    stand_in.reset()
    yield stand_in
    sys.modules.pop("acl", None)


@pytest.fixture
def ascend_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-ins for `atc` and `npu-smi` on PATH for one test."""
    monkeypatch.setenv("PATH", ascend_tools_path(tmp_path / "ascend-bin"))
    return tmp_path / "ascend-bin"


# --- the CLIs as a user runs them, and the acceptance thresholds ------------------------------------

BIN = Path(__import__("sys").executable).parent


def pi0_export(*argv: object) -> str:
    """`pi0-export ARGV...` in this process (`exporter.cli.main`, the console script's function: a process
    per export would pay seconds of imports each; tests/test_cli.py runs the script itself) -> what it
    printed on stdout; fails the test, with what it logged, on a non-zero exit."""
    import contextlib
    import io

    from exporter.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    assert status == 0, err.getvalue()
    return out.getvalue()


def export_cli(checkpoint: Path, out: Path, precision: str, *extra: str) -> Path:
    """`pi0-export bundle --checkpoint C --precision P --out O EXTRA...`; fails the test on a non-zero exit."""
    pi0_export("bundle", "--checkpoint", checkpoint, "--precision", precision, "--out", out, *extra)
    return out


def export_fixtures(factory: pytest.TempPathFactory, names: tuple[str, ...]) -> dict[tuple[str, str], Path]:
    """Each fixture (its checkpoint with its tokenizer.model) exported by the CLI in fp32 and fp16."""
    return {
        (name, precision): export_cli(
            FIXTURES / name / "checkpoint",
            factory.mktemp(name) / precision,
            precision,
            "--tokenizer",
            str(FIXTURES / name / "tokenizer.model"),
        )
        for name in names
        for precision in ("fp32", "fp16")
    }


def inspect_cli(checkpoint: Path, *extra: str) -> dict:
    """`pi0-export inspect --checkpoint C EXTRA...` -> its JSON report; fails the test on a non-zero exit."""
    import json

    return json.loads(pi0_export("inspect", "--checkpoint", checkpoint, *extra))


def infer_cli(bundle: Path, arrays: dict, noise: np.ndarray, tmp: Path) -> np.ndarray:
    """`pi0-runtime infer --bundle B --obs OBS.npz --noise N.npy --out A.npy` -> the actions."""
    import subprocess

    np.savez(tmp / "obs.npz", **arrays)
    np.save(tmp / "noise.npy", noise)
    command = [BIN / "pi0-runtime", "infer", "--bundle", bundle, "--obs", tmp / "obs.npz", "--noise", tmp / "noise.npy"]
    result = subprocess.run([str(c) for c in [*command, "--out", tmp / "a.npy"]], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return np.load(tmp / "a.npy")


def check_actions(actions: np.ndarray, want: np.ndarray, precision: str) -> None:
    """fp32: max abs <= 1e-4; fp16: cosine >= 0.999 and mean abs <= 1e-2 (against the framework's fp32)."""
    from exporter.validate import compare

    m = compare(actions, want)
    print(
        f"\n{precision}: max abs {m['max_abs']:.2e}, mean abs {m['mean_abs']:.2e}, cosine {m['cosine']:.8f}"
    )  # pytest -s
    if precision == "fp32":
        assert m["max_abs"] <= 1e-4, m
    else:
        assert m["cosine"] >= 0.999 and m["mean_abs"] <= 1e-2, m

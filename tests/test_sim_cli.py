"""`pi0-sim`'s command line: every setting of `train`, `eval`, `run` and `record` reaches the settings
object the work receives (a flag parsed and then dropped fails here), and every command given a path
that is not there exits 2 with one line naming it, never a traceback."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import sim.evaluate
import sim.harness
import sim.record
from sim.cli import RECORD_SETTINGS
from sim.cli import main as pi0_sim
from sim.settings import EvalSettings, RunSettings, TrainSettings, add_arguments, from_arguments, to_arguments

ROOT = Path(__file__).resolve().parents[1]

# For every field of each settings class: the flags that set it and the value it must arrive as, never
# its default (so that a dropped flag shows). A field added without a row here fails `covered`.
TRAIN = {
    "preset": (["--preset", "pi0-dummy"], "pi0-dummy"),
    "steps": (["--steps", "7"], 7),
    "batch_size": (["--batch-size", "3"], 3),
    "lr": (["--lr", "0.002"], 0.002),
    "weight_decay": (["--weight-decay", "0.05"], 0.05),
    "seed": (["--seed", "11"], 11),
    "frame_stride": (["--frame-stride", "4"], 4),
    "log_every": (["--log-every", "5"], 5),
    "checkpoint_every": (["--checkpoint-every", "6"], 6),
    "snapshot_every": (["--snapshot-every", "2"], 2),
    "weights_dtype": (["--weights-dtype", "float16"], "float16"),
    "init": (["--init", "start"], Path("start")),
    "condition": (["--condition"], True),
    "condition_dropout": (["--condition-dropout", "0.3"], 0.3),
}
EVAL = {
    "policies": (["--policy", "a=one", "--policy", "two"], ("a=one", "two")),
    "tokenizer": (["--tokenizer", "tok.model"], Path("tok.model")),
    "steps": (["--steps", "4", "2"], (4, 2)),
    "modes": (["--modes", "delay", "rtc"], ("delay", "rtc")),
    "delay": (["--delay", "3"], 3),
    "episodes": (["--episodes", "9"], 9),
    "seed": (["--seed", "40"], 40),
    "demonstrations": (["--demonstrations", "demos"], Path("demos")),
    "workers": (["--workers", "3"], 3),
    "ray": (["--ray", "10.0.0.7:6379"], "10.0.0.7:6379"),
    "actions_per_chunk": (["--actions-per-chunk", "10"], 10),
    "max_steps": (["--max-steps", "60"], 60),
    "prompt": (["--prompt", "pick up"], "pick up"),
    "end_on_success": (["--no-end-on-success"], False),
    "guidance": (["--guidance", "1", "2.5"], (1.0, 2.5)),
}
RUN = {
    "task": (["--task", "AlohaInsertion-v0"], "AlohaInsertion-v0"),
    "prompt": (["--prompt", "insert it"], "insert it"),
    "seed": (["--seed", "5"], 5),
    "episodes": (["--episodes", "4"], 4),
    "max_steps": (["--max-steps", "30"], 30),
    "actions_per_chunk": (["--actions-per-chunk", "8"], 8),
    "delay": (["--delay", "2"], 2),
    "rtc": (["--rtc"], True),
    "end_on_success": (["--no-end-on-success"], False),
    "render_fix": (["--no-render-fix"], False),
    "timeout": (["--timeout", "7.5"], 7.5),
    "guidance_scale": (["--guidance-scale", "2.5"], 2.5),
}


def flags(table: dict[str, tuple[list[str], Any]]) -> list[str]:
    return [arg for argv, _ in table.values() for arg in argv]


def expected(settings: type, table: dict[str, tuple[list[str], Any]]) -> Any:
    return settings(**{name: value for name, (_, value) in table.items()})


@pytest.mark.parametrize(("settings", "table"), [(TrainSettings, TRAIN), (EvalSettings, EVAL), (RunSettings, RUN)])
def test_the_tables_cover_every_setting_with_a_value_other_than_its_default(settings: type, table: dict) -> None:
    assert set(table) == {f.name for f in fields(settings)}
    defaults = {f.name: f.default for f in fields(settings)}
    assert all(value != defaults[name] for name, (_, value) in table.items())


def fake_recordings(directory: Path, seeds: list[int]) -> Path:
    for i, seed in enumerate(seeds):
        episode = directory / f"episode_{i:06d}"
        episode.mkdir(parents=True)
        (episode / "meta.json").write_text(json.dumps({"seed": seed}))
    return directory


def test_every_train_setting_reaches_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sim.train

    received: dict[str, Any] = {}

    def train(episodes: Path, out: Path, tokenizer: Path, settings: TrainSettings, **options: Any) -> Path:
        received.update(episodes=episodes, out=out, tokenizer=tokenizer, settings=settings, resume=options["resume"])
        return out / "checkpoint"

    monkeypatch.setattr(sim.train, "train", train)
    episodes, out, tokenizer = fake_recordings(tmp_path / "demos", [100]), tmp_path / "out", tmp_path / "tok.model"
    tokenizer.write_bytes(b"")
    out.mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "start").mkdir()  # --init's checkpoint directory: checked before training
    for name in ("train_state.safetensors", "train_state.json"):  # what --resume continues from
        (out / name).write_bytes(b"")
    argv = ["train", str(episodes), "--out", str(out), "--tokenizer", str(tokenizer), "--resume", *flags(TRAIN)]
    assert pi0_sim(argv) == 0
    assert received == {
        "episodes": [episodes], "out": out, "tokenizer": tokenizer, "settings": expected(TrainSettings, TRAIN),
        "resume": True,
    }  # fmt: skip


def test_every_eval_setting_reaches_evaluate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    received = []
    monkeypatch.setattr(sim.evaluate, "evaluate", lambda settings, progress: received.append(settings) or [])
    assert pi0_sim(["eval", *flags(EVAL)]) == 0
    assert received == [expected(EvalSettings, EVAL)]
    assert received[0].seeds == tuple(range(40, 49))
    assert capsys.readouterr().out.startswith("| policy |")  # the (empty) table


@pytest.mark.parametrize("command", ["run", "record"])
def test_every_run_setting_reaches_run_episodes(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` takes every `RunSettings` field; `record` those of `RECORD_SETTINGS`, the rest left at their defaults."""
    received = []

    def run_episodes(policy: Any, settings: RunSettings, **options: Any) -> dict[str, Any]:
        received.append(settings)
        return {"aborted": None, "success_rate": 1.0}

    table = RUN if command == "run" else {k: v for k, v in RUN.items() if k in RECORD_SETTINGS}
    monkeypatch.setattr(sim.harness if command == "run" else sim.record, "run_episodes", run_episodes)
    endpoint = f"ipc://{tmp_path}/nobody.sock"  # never asked: run_episodes is the stand-in
    extra = ["--out", str(tmp_path / "out")] if command == "record" else []
    assert pi0_sim([command, "--endpoint", endpoint, *extra, *flags(table)]) == 0
    assert received == [expected(RunSettings, table)]


def test_to_arguments_gives_the_settings_back() -> None:
    """A recipe's command line (`to_arguments`) parses back to the same settings."""
    for settings, table in ((TrainSettings, TRAIN), (EvalSettings, EVAL), (RunSettings, RUN)):
        parser = argparse.ArgumentParser()
        add_arguments(parser, settings)
        for value in (settings(policies=("x",)) if settings is EvalSettings else settings(), expected(settings, table)):
            assert from_arguments(settings, parser.parse_args(to_arguments(value))) == value


# --- a path that is not there -------------------------------------------------------------------------


# Each command with each path it takes missing (or of the wrong kind), and the path its one line must name:
# {missing} is not there, {tmp} a directory that is neither a bundle nor recordings, {bundle} a directory
# with a manifest.json, {demos} a directory of recordings, {file} a regular file.
PARITY = "parity --preset pi0-dummy --episode {demos}/episode_000000"
MISSING = {
    "run --bundle": ("run --bundle {missing}", "{missing}"),
    "run --bundle, not a bundle": ("run --bundle {tmp}", "{tmp}"),
    "oracle-serve --endpoint": ("oracle-serve --endpoint ipc://{missing}/policy.sock", "{missing}"),
    "reference-serve --checkpoint": ("reference-serve --checkpoint {missing}", "{missing}"),
    "reference-serve --tokenizer": ("reference-serve --checkpoint {tmp} --tokenizer {missing}", "{missing}"),
    "eval --policy": ("eval --policy x={missing}", "{missing}"),
    "eval --tokenizer": ("eval --policy {bundle} --tokenizer {missing}", "{missing}"),
    "eval --demonstrations": ("eval --policy {bundle} --demonstrations {missing}", "{missing}"),
    "record --out": ("record --out {file}/episodes", "{file}/episodes"),
    "stats": ("stats {missing}", "{missing}"),
    "stats, no recordings": ("stats {bundle}", "{bundle}"),
    "train": ("train {missing} --out {tmp}/out", "{missing}"),
    "train --tokenizer": ("train {demos} --out {tmp}/out --tokenizer {missing}", "{missing}"),
    "train --resume": ("train {demos} --out {missing} --resume", "{missing}"),
    "parity --bundle": (PARITY + " --bundle {missing}", "{missing}"),
    "parity --checkpoint": ("parity --bundle {bundle} --checkpoint {missing} --episode {demos}", "{missing}"),
    "parity --episode": ("parity --bundle {bundle} --preset pi0-dummy --episode {missing}", "{missing}"),
}


def missing_path_case(case: str, tmp_path: Path) -> tuple[list[str], str]:
    """The argv of MISSING[case] on real files under tmp_path, and the path its one line must name."""
    paths = {"missing": tmp_path / "missing", "tmp": tmp_path, "bundle": tmp_path / "bundle", "file": tmp_path / "f"}
    paths["demos"] = fake_recordings(tmp_path / "demos", [100])
    paths["bundle"].mkdir()
    (paths["bundle"] / "manifest.json").write_text("{}")
    paths["file"].write_text("")
    command, named = (text.format(**paths) for text in MISSING[case])
    return command.split(), named


@pytest.mark.parametrize("case", sorted(MISSING))
def test_a_missing_path_is_one_line_and_exit_2(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """In this process (`sim.cli.main`, what the console script calls): a process per case costs a
    second of imports each; the test below runs the real entry point once."""
    argv, named = missing_path_case(case, tmp_path)
    caplog.set_level("INFO")
    assert pi0_sim(argv) == 2
    said = [record.getMessage() for record in caplog.records]
    printed = capsys.readouterr()
    assert len(said) == 1 and caplog.records[0].levelname == "ERROR" and named in said[0], said
    assert "\n" not in said[0] and not printed.out and not printed.err, (said, printed)


@pytest.mark.system  # a process
def test_the_entry_point_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    argv, named = missing_path_case("train", tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "sim.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1 and named in output, output


# --- pi0-sim eval --ray, refused before anything is served ------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case", ["ray not installed", "nothing at the address", "nothing at RAY_ADDRESS", "not an address"]
)
def test_eval_ray_refusals_are_one_line_and_exit_2(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray missing (it is the `ray` extra, never the robot's), no cluster where --ray points, or no HOST:PORT
    there: one line naming --ray, exit 2, before any policy is served (tests/test_sim_ray.py runs a cluster)."""
    nowhere = f"127.0.0.1:{closed_port()}"
    address, said = {
        "ray not installed": ("auto", "Ray is not installed"),
        "nothing at the address": (nowhere, "no Ray cluster answers there"),
        "nothing at RAY_ADDRESS": ("auto", f"(RAY_ADDRESS {nowhere}): no Ray cluster answers there"),
        "not an address": ("head-node", "expected auto or the head's HOST:PORT"),
    }[case]
    if case == "ray not installed":
        monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if case == "nothing at RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", nowhere)
    monkeypatch.setattr(sim.evaluate, "run_configuration", lambda *a, **k: pytest.fail("served with no cluster"))
    caplog.set_level("INFO")
    assert pi0_sim(["eval", "--policy", f"p={tmp_path}", "--episodes", "2", "--ray", address]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"--ray {address}") and said in errors[0], errors
    assert "\n" not in errors[0]

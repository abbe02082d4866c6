"""Our engine side by side with LeRobot 0.3.3's pi0 on the same weights, same inputs, same noise.

LeRobot runs in its own venv (`make lerobot-venv`) through `benchmarks/lerobot_worker.py`, which also
makes the checkpoint with LeRobot itself (pi0's real widths, vision depth 3, language and expert depth
2, random weights). We export our bundles from that checkpoint with `pi0-export bundle` (fp32, validated;
int8, validated against the model's bf16 run or refused), then time requests alternately: LeRobot fp32,
LeRobot bf16, ours fp32 and int8 (and, for the empty-slot case, ours with the slots kept), one at a time on
all cores. LeRobot is timed over `select_action` (normalize,
tokenize, resize, sample, unnormalize) on float images; ours over `Engine.infer` (the same, from uint8
images). Both get the token ids LeRobot's tokenizer made, so the comparison is of the models alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.cli import main
from benchmarks.fraction_of_peak import depths, shallow_pi0
from exporter.checkpoint import LoadedPolicy
from exporter.dims import PRESETS, Pi0Dims
from exporter.pi0 import Pi0
from exporter.presets import preset_spec
from exporter.readers.lerobot_v03 import save_lerobot
from exporter.tokenizer_train import train_tokenizer
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.daemon.stats import summarize
from runtime.engine import Engine
from runtime.pipeline.observation import Observation

ROOT = Path(__file__).resolve().parents[1]
LEROBOT_PYTHON = ROOT / "build" / "lerobot-venv" / "bin" / "python"
WORKER = Path(__file__).with_name("lerobot_worker.py")
CASES = {
    "2 cameras": {"cameras": ["top", "wrist"], "empty_cameras": 0},
    "1 camera + 2 empty slots": {"cameras": ["top"], "empty_cameras": 2},
}
PROMPT = "Transfer the cube"
STATE_DIM, CHUNK, MAX_ACTION_DIM = 14, 50, 32
LEROBOT = "LeRobot side"  # the part of the smoke that needs LeRobot's venv
# --smoke: the tiny model, one round, bundles unvalidated; LeRobot's side only where its venv is.
SMOKE = {"n": 1, "dims": PRESETS["pi0-dummy"], "validate": False, "require_lerobot": False}


def lerobot_missing() -> str | None:
    """Why LeRobot's side cannot run here, or None when it can."""
    if LEROBOT_PYTHON.exists():
        return None
    return f"{LEROBOT_PYTHON.relative_to(ROOT)} is missing (`make lerobot-venv` makes it)"


def lerobot_shape(dims: Pi0Dims) -> dict[str, dict[str, int]]:
    """`dims` in the names of the transformers configs LeRobot's pi0 builds (the worker sets them)."""
    v = dims.vision
    vision = {"hidden_size": v.width, "num_hidden_layers": v.depth, "intermediate_size": v.mlp_dim}
    shape = {"vision": vision | {"num_attention_heads": v.num_heads}}
    for name, d in (("text", dims.language), ("expert", dims.expert)):
        shape[name] = {
            "hidden_size": d.width, "num_hidden_layers": d.depth, "intermediate_size": d.mlp_dim,
            "num_attention_heads": d.num_heads, "head_dim": d.head_dim, "num_key_value_heads": d.num_kv_heads,
        }  # fmt: skip
    return shape


class Worker:
    """One LeRobot process; requests and replies are JSON lines."""

    def __init__(self, log) -> None:
        self.process = subprocess.Popen(
            [str(LEROBOT_PYTHON), str(WORKER), str(os.cpu_count() or 1)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )

    def __call__(self, **request: object) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        reply = json.loads(line) if line else {"ok": False, "error": "the LeRobot worker exited (see its log)"}
        if not reply.pop("ok"):
            raise RuntimeError(f"LeRobot worker, {request['cmd']}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def make_checkpoint(out: Path, dims: Pi0Dims, case: dict, tokenizer: Path, lerobot: bool, log) -> int:
    """A random-weight pi0 of `dims` with the case's cameras, as a LeRobot 0.3.3 checkpoint in `out`: made by
    LeRobot itself (`lerobot`), else (a smoke run without LeRobot's venv) written by our `save_lerobot`.
    -> its parameter count."""
    if lerobot:
        maker = Worker(log)
        shape = lerobot_shape(dims)
        made = maker(
            cmd="make", out=str(out), state_dim=STATE_DIM, seed=0, tokenizer=str(tokenizer), shape=shape, **case
        )
        maker.close()
        return made["parameters"]
    torch.manual_seed(0)
    model = Pi0(dims).eval().requires_grad_(False)
    cameras = tuple(f"observation.images.{c}" for c in case["cameras"])
    spec = dataclasses.replace(
        preset_spec(),
        camera_keys=cameras,
        camera_shapes=((3, 480, 640),) * len(cameras),
        empty_cameras=case["empty_cameras"],
    )
    save_lerobot(LoadedPolicy(model=model, spec=spec, source="benchmark"), out)
    return sum(p.numel() for p in model.parameters())


def export(
    checkpoint: Path, out: Path, tokenizer: Path, keep_empty: bool, validate: bool, log, precision: str = "fp32"
) -> str | None:
    """`pi0-export bundle` of the checkpoint -> None, or for an int8 bundle the exporter's one-line reason
    when it refuses one (its matmuls are chosen by validation, so int8 always validates)."""
    command = [
        str(Path(sys.executable).with_name("pi0-export")), "bundle", "--checkpoint", str(checkpoint),
        "--out", str(out), "--tokenizer", str(tokenizer), "--precision", precision, "--atc", "never",
    ]  # fmt: skip
    validate = validate or precision == "int8"
    command += (["--keep-empty-cameras"] if keep_empty else []) + ([] if validate else ["--no-validate"])
    done = subprocess.run(command, capture_output=True, text=True)
    log.write(done.stdout + done.stderr)
    if done.returncode == 0:
        return None
    if precision == "int8" and done.returncode == 2:  # a refusal, said in one line
        return done.stderr.strip().splitlines()[-1]
    raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)


def inputs(cameras: list[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = {f"image.{c}": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for c in cameras}
    data["state"] = rng.standard_normal(STATE_DIM).astype(np.float32)
    data["noise"] = rng.standard_normal((1, CHUNK, MAX_ACTION_DIM)).astype(np.float32)
    data["prompt"] = np.array(PROMPT)
    return data


def run_case(
    name: str, case: dict, tmp: Path, tokenizer: Path, n: int, dims: Pi0Dims, validate: bool, lerobot: bool, log
) -> dict:
    print(f"[side-by-side] {name}: making the checkpoint ...", file=sys.stderr, flush=True)
    checkpoint = tmp / "checkpoint"
    parameters = make_checkpoint(checkpoint, dims, case, tokenizer, lerobot, log)
    bundles = {"ours": tmp / "bundle", "ours int8": tmp / "bundle-int8"}
    if case["empty_cameras"]:
        bundles["ours, empty slots kept"] = tmp / "bundle-kept"
    refused = {}
    for label, out in list(bundles.items()):
        print(f"[side-by-side] {name}: exporting {label} ...", file=sys.stderr, flush=True)
        precision = "int8" if label == "ours int8" else "fp32"
        keep_empty = label == "ours, empty slots kept"
        reason = export(checkpoint, out, tokenizer, keep_empty, validate, log, precision)
        if reason is not None:
            refused[label] = reason
            del bundles[label]

    workers, loaded = {}, {}
    for precision in ("fp32", "bf16") if lerobot else ():
        workers[precision] = Worker(log)
        loaded[precision] = workers[precision](
            cmd="load",
            checkpoint=str(checkpoint),
            precision=precision,
            tokenizer=str(tokenizer),
            shape=lerobot_shape(dims),
        )
    engines = {}
    for label, out in bundles.items():
        bundle = load_bundle(out)
        engines[label] = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle))
    data = inputs(case["cameras"], seed=1)
    request_path = tmp / "request.npz"
    np.savez(request_path, **data)
    if lerobot:  # the prompt's tokens as LeRobot's tokenizer makes them, so that the models alone are compared
        reply = workers["fp32"](cmd="tokens", inputs=str(request_path))
        prompt = {
            "tokens": np.array([reply["tokens"]], dtype=np.int64),
            "token_mask": np.array([reply["mask"]], dtype=bool),
        }
    else:
        prompt = {"prompt": PROMPT}
    images = {f"observation.images.{c}": data[f"image.{c}"] for c in case["cameras"]}
    request = Observation(images, data["state"], noise=data["noise"], **prompt)

    runners = {f"LeRobot {p}": worker for p, worker in workers.items()} | engines
    seconds: dict[str, list[float]] = {label: [] for label in runners}
    actions: dict[str, np.ndarray] = {}
    for i in range(n + 1):  # the first round warms up and is not counted
        print(f"[side-by-side] {name}: round {i}/{n} ...", file=sys.stderr, flush=True)
        for label, runner in runners.items():
            if isinstance(runner, Engine):
                start = time.perf_counter()
                actions[label], _ = runner.infer(request)
                elapsed = time.perf_counter() - start
            else:
                out = tmp / "actions.npy"
                elapsed = runner(cmd="infer", inputs=str(request_path), out=str(out))["seconds"]
                actions[label] = np.load(out, allow_pickle=False)
            if i:
                seconds[label].append(elapsed)
    for worker in workers.values():
        worker.close()
    for engine in engines.values():
        engine.close()

    medians = {label: float(np.median(s)) for label, s in seconds.items()}
    result = {
        "parameters": parameters,
        "prefix_tokens": {
            label: e.spec.num_camera_slots * dims.image_tokens + e.spec.tokenizer_max_length
            for label, e in engines.items()
        },
        "ms": {
            label: {**summarize(1e3 * np.array(s)), "min": 1e3 * min(s), "max": 1e3 * max(s)}
            for label, s in seconds.items()
        },
        "n": n,
        "refused": refused,
    }
    if lerobot:
        reference = actions["LeRobot fp32"]
        result |= {
            "lerobot_dtypes": {p: r["dtypes"] for p, r in loaded.items()},
            "torch": loaded["fp32"]["torch"],
            "threads": loaded["fp32"]["threads"],
            "speedup_vs_lerobot_fp32": {label: medians["LeRobot fp32"] / m for label, m in medians.items()},
            "max_abs_vs_lerobot_fp32": {label: float(np.abs(a - reference).max()) for label, a in actions.items()},
            "speedup_vs_lerobot_bf16": {label: medians["LeRobot bf16"] / m for label, m in medians.items()},
        }
    return result


def run(n: int = 5, dims: Pi0Dims | None = None, validate: bool = True, require_lerobot: bool = True) -> dict:
    """`dims`: pi0's widths at the reduced depth unless given; `validate`: the exports' own check against
    PyTorch; `require_lerobot` False: without LeRobot's venv, time ours alone and say why in `skipped`."""
    dims = dims or shallow_pi0()
    missing = lerobot_missing()
    if missing and require_lerobot:
        raise SystemExit(f"{missing}: the side by side needs LeRobot")
    if missing:
        print(f"[side-by-side] {LEROBOT} SKIPPED: {missing}; ours alone", file=sys.stderr, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as log:
        tokenizer = train_tokenizer(Path(tmp) / "tokenizer.model")
        try:
            for index, (name, case) in enumerate(CASES.items()):
                case_dir = Path(tmp) / f"case{index}"
                case_dir.mkdir()
                results[name] = run_case(name, case, case_dir, tokenizer, n, dims, validate, missing is None, log)
        except Exception:
            log.seek(0)
            print(log.read()[-5000:], file=sys.stderr)
            raise
    return {"depth": depths(dims), "cases": results} | ({"skipped": {LEROBOT: missing}} if missing else {})


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(sbs: dict) -> list[str]:
    depth = sbs["depth"]
    sections = [
        "## Side by side with LeRobot (`benchmarks/lerobot_side_by_side.py`)",
        "LeRobot 0.3.3's `PI0Policy` makes a checkpoint at pi0's real widths with vision depth "
        f"{depth['vision']}, language and expert depth {depth['language']} (random weights; chunk 50, 10 steps, "
        "14-dim state, 480x640 cameras); `pi0-export bundle` exports our fp32 bundle from that very checkpoint. "
        "So is our int8 bundle (`--precision int8`: validated against the model's own bf16 run, or refused with "
        "its reason). Then, one request at a time on all cores, alternating: LeRobot fp32 (`select_action`), "
        "LeRobot bf16 (as shipped), ours fp32 and int8 (`Engine.infer`, onnxruntime CPU), same images, state, "
        "prompt tokens and noise. LeRobot runs in its own venv (`make lerobot-venv`: lerobot 0.3.3 with --no-deps, transformers "
        "4.55.4; torchvision forces torch 2.14.1 there), its tokenizer read from a local file (no network), and "
        "for fp32 its hard-coded bfloat16 casts mapped to float32 (`benchmarks/lerobot_worker.py` says how). "
        "Max abs is over the whole de-normalized chunk against LeRobot fp32. Targets: ours >= 1.3x LeRobot fp32 "
        "with 2 cameras; >= 2.5x with 1 camera + 2 empty slots, actions within 1e-4; ours int8 >= 1.3x LeRobot "
        "bf16 as shipped with 2 cameras.",
    ]
    if "skipped" in sbs:
        sections.append(f"**{LEROBOT} skipped**: {sbs['skipped'][LEROBOT]}; ours alone, on a checkpoint we wrote.")
    for name, case in sbs["cases"].items():
        lerobot = (
            f" in LeRobot's model, LeRobot on torch {case['torch']} with {case['threads']} threads"
            if "torch" in case
            else ""
        )
        speedup, max_abs = case.get("speedup_vs_lerobot_fp32", {}), case.get("max_abs_vs_lerobot_fp32", {})
        versus_bf16 = case.get("speedup_vs_lerobot_bf16", {})
        refused = "".join(
            f"\n\n{label} **refused** by the exporter: {why}" for label, why in case.get("refused", {}).items()
        )
        sections.append(
            f"**{name}** ({case['parameters'] / 1e6:,.0f} M parameters{lerobot}, "
            f"{case['n']} timed rounds after one warm-up; prefix tokens: "
            + ", ".join(f"{label} {tokens}" for label, tokens in case["prefix_tokens"].items())
            + ")\n\n| implementation | p50 ms | min ms | max ms | speed-up vs LeRobot fp32 | vs LeRobot bf16 "
            "| max abs vs LeRobot fp32 |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {label} | {ms['p50']:.0f} | {ms['min']:.0f} | {ms['max']:.0f} "
                f"| {_figure(speedup, label, '.2f', 'x')} | {_figure(versus_bf16, label, '.2f', 'x')} "
                f"| {_figure(max_abs, label, '.2g')} |"
                for label, ms in case["ms"].items()
            )
            + refused
        )
    return sections


def _figure(figures: dict[str, float], label: str, spec: str, unit: str = "") -> str:
    """One implementation's figure against LeRobot fp32; "-" where LeRobot did not run."""
    return format(figures[label], spec) + unit if label in figures else "-"


def targets(sbs: dict) -> list[tuple[str, str, str]]:
    wanted = {
        "ours / LeRobot fp32, same weights, 2 cameras": ">= 1.3x",
        "ours / LeRobot fp32, 1 camera + 2 empty slots; max abs diff": ">= 2.5x; <= 1e-4",
        "ours int8 / LeRobot bf16 as shipped, same weights, 2 cameras; max abs of each vs LeRobot fp32": ">= 1.3x",
    }
    if "skipped" in sbs:
        return [(target, want, f"not measured: {sbs['skipped'][LEROBOT]}") for target, want in wanted.items()]
    two, empty = sbs["cases"]["2 cameras"], sbs["cases"]["1 camera + 2 empty slots"]
    measured = [
        f"{two['speedup_vs_lerobot_fp32']['ours']:.2f}x",
        f"{empty['speedup_vs_lerobot_fp32']['ours']:.2f}x; {empty['max_abs_vs_lerobot_fp32']['ours']:.1g}",
        int8_figure(two),
    ]
    return [(target, want, m) for (target, want), m in zip(wanted.items(), measured, strict=True)]


def int8_figure(case: dict) -> str:
    """Ours int8 against LeRobot bf16 with each one's error, or the exporter's refusal."""
    if "ours int8" in case.get("refused", {}):
        return f"**not measured: the int8 bundle was refused** ({case['refused']['ours int8']})"
    if "speedup_vs_lerobot_bf16" not in case:  # a result from before the int8 row
        return "not measured"
    ratio = case["speedup_vs_lerobot_bf16"]["ours int8"]
    errors = case["max_abs_vs_lerobot_fp32"]
    verdict = "" if ratio >= 1.3 else ": **missed**"
    return (
        f"{ratio:.2f}x{verdict} (max abs: ours int8 {errors['ours int8']:.2g}, "
        f"LeRobot bf16 {errors['LeRobot bf16']:.2g})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="timed rounds after the warm-up one (default 5)")
    main(run, SMOKE, parser)

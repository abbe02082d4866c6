"""Our engine side by side with LeRobot 0.3.3's pi0 on the same weights, same inputs, same noise.

LeRobot runs in its own venv (`make lerobot-venv`) through `benchmarks/lerobot_worker.py`, which also
makes the checkpoint with LeRobot itself (pi0's real widths, vision depth 3, language and expert depth
2, random weights). We export our bundle from that checkpoint with `pi0-export bundle` (fp32, validated),
then time requests alternately: LeRobot fp32, ours, LeRobot bf16 (and, for the empty-slot case, ours
with the slots kept), one at a time on all cores. LeRobot is timed over `select_action` (normalize,
tokenize, resize, sample, unnormalize) on float images; ours over `Engine.infer` (the same, from uint8
images). Both get the token ids LeRobot's tokenizer made, so the comparison is of the models alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from exporter.tokenizer_train import train_tokenizer
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle import load_bundle
from runtime.engine import Engine
from runtime.stats import summarize

ROOT = Path(__file__).resolve().parents[1]
LEROBOT_PYTHON = ROOT / "build" / "lerobot-venv" / "bin" / "python"
WORKER = Path(__file__).with_name("lerobot_worker.py")
CASES = {
    "2 cameras": {"cameras": ["top", "wrist"], "empty_cameras": 0},
    "1 camera + 2 empty slots": {"cameras": ["top"], "empty_cameras": 2},
}
PROMPT = "Transfer the cube"
STATE_DIM, CHUNK, MAX_ACTION_DIM = 14, 50, 32


class Worker:
    """One LeRobot process; requests and replies are JSON lines."""

    def __init__(self, log) -> None:
        if not LEROBOT_PYTHON.exists():
            raise SystemExit(f"{LEROBOT_PYTHON} is missing: run `make lerobot-venv` first")
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


def export(checkpoint: Path, out: Path, tokenizer: Path, keep_empty: bool, log) -> None:
    command = [
        str(Path(sys.executable).with_name("pi0-export")), "bundle", "--checkpoint", str(checkpoint),
        "--out", str(out), "--tokenizer", str(tokenizer), "--precision", "fp32", "--atc", "never",
    ]  # fmt: skip
    subprocess.run(command + (["--keep-empty-cameras"] if keep_empty else []), check=True, stdout=log, stderr=log)


def inputs(cameras: list[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = {f"image.{c}": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for c in cameras}
    data["state"] = rng.standard_normal(STATE_DIM).astype(np.float32)
    data["noise"] = rng.standard_normal((1, CHUNK, MAX_ACTION_DIM)).astype(np.float32)
    data["prompt"] = np.array(PROMPT)
    return data


def run_case(name: str, case: dict, tmp: Path, tokenizer: Path, n: int, log) -> dict:
    print(f"[side-by-side] {name}: LeRobot makes the checkpoint ...", file=sys.stderr, flush=True)
    checkpoint, maker = tmp / "checkpoint", Worker(log)
    made = maker(cmd="make", out=str(checkpoint), state_dim=STATE_DIM, seed=0, tokenizer=str(tokenizer), **case)
    maker.close()
    bundles = {"ours": tmp / "bundle"}
    if case["empty_cameras"]:
        bundles["ours, empty slots kept"] = tmp / "bundle-kept"
    for label, out in bundles.items():
        print(f"[side-by-side] {name}: exporting {label} ...", file=sys.stderr, flush=True)
        export(checkpoint, out, tokenizer, keep_empty=label != "ours", log=log)

    lerobot, loaded = {}, {}
    for precision in ("fp32", "bf16"):
        lerobot[precision] = Worker(log)
        loaded[precision] = lerobot[precision](
            cmd="load", checkpoint=str(checkpoint), precision=precision, tokenizer=str(tokenizer)
        )
    engines = {label: Engine(load_bundle(out), OnnxRuntimeBackend(load_bundle(out))) for label, out in bundles.items()}
    data = inputs(case["cameras"], seed=1)
    request_path = tmp / "request.npz"
    np.savez(request_path, **data)
    token_reply = lerobot["fp32"](cmd="tokens", inputs=str(request_path))
    ours_request = {
        "images": {f"observation.images.{c}": data[f"image.{c}"] for c in case["cameras"]},
        "state": data["state"],
        "tokens": np.array([token_reply["tokens"]], dtype=np.int64),
        "token_mask": np.array([token_reply["mask"]], dtype=bool),
        "noise": data["noise"],
    }

    runners = {f"LeRobot {p}": lerobot[p] for p in lerobot} | engines
    seconds: dict[str, list[float]] = {label: [] for label in runners}
    actions: dict[str, np.ndarray] = {}
    for i in range(n + 1):  # the first round warms up and is not counted
        print(f"[side-by-side] {name}: round {i}/{n} ...", file=sys.stderr, flush=True)
        for label, runner in runners.items():
            if isinstance(runner, Engine):
                start = time.perf_counter()
                actions[label], _ = runner.infer(**ours_request)
                elapsed = time.perf_counter() - start
            else:
                out = tmp / "actions.npy"
                elapsed = runner(cmd="infer", inputs=str(request_path), out=str(out))["seconds"]
                actions[label] = np.load(out, allow_pickle=False)
            if i:
                seconds[label].append(elapsed)
    for worker in lerobot.values():
        worker.close()
    for engine in engines.values():
        engine.close()

    reference = actions["LeRobot fp32"]
    medians = {label: float(np.median(s)) for label, s in seconds.items()}
    return {
        "parameters": made["parameters"],
        "lerobot_dtypes": {p: r["dtypes"] for p, r in loaded.items()},
        "torch": loaded["fp32"]["torch"],
        "threads": loaded["fp32"]["threads"],
        "prefix_tokens": {
            label: e.spec.num_camera_slots * 256 + e.spec.tokenizer_max_length for label, e in engines.items()
        },
        "ms": {
            label: {**summarize(1e3 * np.array(s)), "min": 1e3 * min(s), "max": 1e3 * max(s)}
            for label, s in seconds.items()
        },
        "speedup_vs_lerobot_fp32": {label: medians["LeRobot fp32"] / m for label, m in medians.items()},
        "max_abs_vs_lerobot_fp32": {label: float(np.abs(a - reference).max()) for label, a in actions.items()},
        "n": n,
    }


def run(n: int = 5) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as log:
        tokenizer = train_tokenizer(Path(tmp) / "tokenizer.model")
        try:
            for index, (name, case) in enumerate(CASES.items()):
                case_dir = Path(tmp) / f"case{index}"
                case_dir.mkdir()
                results[name] = run_case(name, case, case_dir, tokenizer, n, log)
        except Exception:
            log.seek(0)
            print(log.read()[-5000:], file=sys.stderr)
            raise
    return {"depth": {"vision": 3, "language": 2, "expert": 2}, "cases": results}


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(sbs: dict) -> list[str]:
    depth = sbs["depth"]
    sections = [
        "## Side by side with LeRobot (`benchmarks/lerobot_side_by_side.py`)",
        "LeRobot 0.3.3's `PI0Policy` makes a checkpoint at pi0's real widths with vision depth "
        f"{depth['vision']}, language and expert depth {depth['language']} (random weights; chunk 50, 10 steps, "
        "14-dim state, 480x640 cameras); `pi0-export bundle` exports our fp32 bundle from that very checkpoint. "
        "Then, one request at a time on all cores, alternating: LeRobot fp32 (`select_action`), ours "
        "(`Engine.infer`, onnxruntime CPU), LeRobot bf16 (as shipped), same images, state, prompt tokens and "
        "noise. LeRobot runs in its own venv (`make lerobot-venv`: lerobot 0.3.3 with --no-deps, transformers "
        "4.55.4; torchvision forces torch 2.14.1 there), its tokenizer read from a local file (no network), and "
        "for fp32 its hard-coded bfloat16 casts mapped to float32 (`benchmarks/lerobot_worker.py` says how). "
        "Max abs is over the whole de-normalized chunk against LeRobot fp32. Targets: ours >= 1.3x LeRobot fp32 "
        "with 2 cameras; >= 2.5x with 1 camera + 2 empty slots, actions within 1e-4.",
    ]
    for name, case in sbs["cases"].items():
        sections.append(
            f"**{name}** ({case['parameters'] / 1e6:,.0f} M parameters in LeRobot's model, LeRobot on torch "
            f"{case['torch']} with {case['threads']} threads, {case['n']} timed rounds after one warm-up; "
            "prefix tokens: "
            + ", ".join(f"{label} {tokens}" for label, tokens in case["prefix_tokens"].items())
            + ")\n\n| implementation | p50 ms | min ms | max ms | speed-up vs LeRobot fp32 | max abs vs LeRobot fp32 |"
            "\n|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {label} | {ms['p50']:.0f} | {ms['min']:.0f} | {ms['max']:.0f} "
                f"| {case['speedup_vs_lerobot_fp32'][label]:.2f}x | {case['max_abs_vs_lerobot_fp32'][label]:.2g} |"
                for label, ms in case["ms"].items()
            )
        )
    return sections


def targets(sbs: dict) -> list[tuple[str, str, str]]:
    cases = sbs["cases"]
    two, empty = cases["2 cameras"], cases["1 camera + 2 empty slots"]
    return [
        ("ours / LeRobot fp32, same weights, 2 cameras", ">= 1.3x", f"{two['speedup_vs_lerobot_fp32']['ours']:.2f}x"),
        (
            "ours / LeRobot fp32, 1 camera + 2 empty slots; max abs diff",
            ">= 2.5x; <= 1e-4",
            f"{empty['speedup_vs_lerobot_fp32']['ours']:.2f}x; {empty['max_abs_vs_lerobot_fp32']['ours']:.1g}",
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 5), indent=2))

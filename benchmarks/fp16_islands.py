"""fp16 at pi0's real widths: every matmul on the Cube in fp16, calibrated power-of-two scaling where
magnitudes pass fp16's range (it replaced the fp32 islands this module is named after), and validation
judged by the model's own precision.

LeRobot 0.3.3 makes a pi0 checkpoint at pi0's real widths with a reduced depth (vision 3, language and
expert 2, 2 cameras; `benchmarks/lerobot_worker.py`, as the side-by-side benchmark). Its random init is
not what a trained pi0 looks like, so the weights are set to a realistic scale (`realistic_`) and the
checkpoint written back in LeRobot's format; a second copy is made deliberately hot (`hot_`: massive
activations of the kind documented for Gemma/LLaMA-class models, in a projector channel and in the
residual stream after the first MLP). Each is exported by `pi0-export bundle` in fp32, fp16 and int8 (the
CPU's, validated against the model's bf16 run or refused) in a fresh process, as a user runs it; the
figures are its report.json's. Then, on this CPU, the engine's latency on each bundle, and on the same
model's fp16 bundle built without the scales (which for the hot model fails validation: it is timed only to
price the scaling, a few elementwise multiplies per scaled op).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.cli import main
from benchmarks.fraction_of_peak import depths, shallow_pi0
from benchmarks.lerobot_side_by_side import LEROBOT, lerobot_missing, make_checkpoint
from benchmarks.render import grid
from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.dims import PRESETS, Pi0Dims
from exporter.readers.lerobot_v03 import save_lerobot
from exporter.tokenizer_train import train_tokenizer
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.engine import Engine, EngineError
from runtime.pipeline.observation import Observation

CASE = {"cameras": ["top", "wrist"], "empty_cameras": 0}
PRECISIONS = ("fp32", "fp16", "int8")  # int8: the CPU backend's (exporter/int8.py)
MODELS = ("realistic", "hot")
# --smoke: the tiny model, hot only (it has scaled ops: every step of the run has something to do), one request.
SMOKE = {"n": 1, "models": ("hot",), "dims": PRESETS["pi0-dummy"], "require_lerobot": False}
HOT_CHANNEL = 7


@torch.no_grad()
def realistic_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights at the scale of a trained pi0 rather than a random init's: matrices N(0, 1/fan_in), biases
    N(0, 0.02^2), Gemma's RMSNorm weights (used as 1 + w) N(0, 0.1^2), SigLIP's LayerNorms 1 + N(0, 0.05^2),
    token embedding N(0, 0.03^2) (x sqrt(2048) in the forward: ~1.4), position embedding N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for name, param in model.named_parameters():
        if "embed_tokens" in name:
            normal(param, 0.03)
        elif "position_embedding" in name:
            normal(param, 0.02)
        elif "layer_norm" in name or "post_layernorm" in name:
            normal(param, 0.05, 1.0) if name.endswith("weight") else normal(param, 0.02)
        elif "layernorm" in name or name.endswith("norm.weight"):
            normal(param, 0.1)
        elif name.endswith("bias"):
            normal(param, 0.02)
        else:
            normal(param, param[0].numel() ** -0.5)  # fan_in: every input of one output row


@torch.no_grad()
def hot_(model: torch.nn.Module) -> None:
    """Massive activations: one projector output channel and one residual channel (written by the first
    language layer's MLP) reach ~1e5, past fp16's 65 504; bf16 and float32 hold them."""
    model.projector.weight[HOT_CHANNEL] *= 3e4
    model.llm.layers[0].mlp.down_proj.weight[HOT_CHANNEL] *= 1e5


def make_checkpoints(
    tmp: Path, tokenizer: Path, models: tuple[str, ...], dims: Pi0Dims, lerobot: bool
) -> dict[str, Path]:
    made = tmp / "lerobot"
    with tempfile.TemporaryFile("w+") as log:  # the LeRobot worker's stderr (a real file: it is a child's)
        try:
            make_checkpoint(made, dims, CASE, tokenizer, lerobot, log)
        except Exception:
            log.seek(0)
            print(log.read()[-5000:], file=sys.stderr)
            raise
    out = {}
    for label in models:
        policy = load_checkpoint(made)
        realistic_(policy.model)
        if label == "hot":
            hot_(policy.model)
        out[label] = save_lerobot(policy, tmp / label)
    return out


def export(checkpoint: Path, out: Path, precision: str, tokenizer: Path) -> dict:
    command = [
        str(Path(sys.executable).with_name("pi0-export")), "bundle", "--checkpoint", str(checkpoint), "--out", str(out),
        "--precision", precision, "--tokenizer", str(tokenizer), "--atc", "never",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    bundle = out if result.returncode == 0 else out.with_name(out.name + ".failed")
    exported = {"exit": result.returncode, "seconds": seconds, "bundle": str(bundle)}
    if not (bundle / "report.json").exists():  # refused before validation (int8: no matmul holds)
        return exported | {"refused": result.stderr.strip().splitlines()[-1]}
    report = json.loads((bundle / "report.json").read_text())
    report["calibration"].pop("ops")  # hundreds of rows; the bundle keeps them
    if "int8" in report:  # what the search tried and every fp32 matmul: in the bundle's report
        report["int8"] = {k: report["int8"][k] for k in ("int8", "int8_flops_share", "ops")}
    return exported | {"report": report}


def latency_ms(bundle: Path, n: int) -> float:
    """Median `Engine.infer` over n requests after one warm-up. A bundle whose actions come out
    non-finite (the hot model without scaling) is timed all the same: the engine computes the whole
    chunk before it refuses to send it."""
    loaded = load_bundle(bundle, verify=False)
    engine = Engine.from_bundle(loaded, OnnxRuntimeBackend(loaded))
    request = Observation.synthetic(engine.metadata())
    seconds = []
    try:
        for i in range(n + 1):
            start = time.perf_counter()
            try:
                engine.infer(request)
            except EngineError as e:
                if e.code != "bad_output":
                    raise
            if i:
                seconds.append(time.perf_counter() - start)
    finally:
        engine.close()
    return 1e3 * float(np.median(seconds))


def run(
    n: int = 3, models: tuple[str, ...] = MODELS, dims: Pi0Dims | None = None, require_lerobot: bool = True
) -> dict:
    """`models`: which of MODELS; `dims`: pi0's widths at the reduced depth unless given; `require_lerobot`
    False: without LeRobot's venv, the checkpoint is written by our `save_lerobot` (and `skipped` says so)."""
    dims = dims or shallow_pi0()
    missing = lerobot_missing()
    if missing and require_lerobot:
        raise SystemExit(f"{missing}: LeRobot makes this benchmark's checkpoint")
    results: dict = {"depth": depths(dims), "cases": {}}
    if missing:
        print(f"[fp16_islands] {LEROBOT} SKIPPED: {missing}; the checkpoint is ours", file=sys.stderr, flush=True)
        results["skipped"] = {LEROBOT: missing}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = train_tokenizer(tmp / "tokenizer.model")
        print("[fp16_islands] making the checkpoint ...", file=sys.stderr, flush=True)
        checkpoints = make_checkpoints(tmp, tokenizer, models, dims, lerobot=missing is None)
        for label, checkpoint in checkpoints.items():
            case: dict = {}
            for precision in PRECISIONS:
                print(f"[fp16_islands] {label} {precision}: export ...", file=sys.stderr, flush=True)
                exported = export(checkpoint, tmp / f"{label}-{precision}", precision, tokenizer)
                if exported["exit"] == 0:
                    exported["latency_ms"] = latency_ms(Path(exported["bundle"]), n)
                case[precision] = exported
            print(f"[fp16_islands] {label}: fp16 without scaling (timing only) ...", file=sys.stderr, flush=True)
            plain = tmp / f"{label}-fp16-plain"
            options = BundleOptions(precision="fp16", tokenizer=tokenizer, atc_mode="never", validate=False, fp16_scaling=False)  # fmt: skip
            build_bundle(load_checkpoint(checkpoint), plain, options, log=lambda _: None)
            case["fp16_without_scaling_latency_ms"] = latency_ms(plain, n)
            results["cases"][label] = case
    return results


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def _scaled_gflops(calibration: dict) -> str:
    total = calibration["matmul_gflops_per_inference"]
    return f"{calibration['scaled_flops_share'] * total:.1f} of {total:.0f}"


def _scaled(calibration: dict) -> str:
    return ", ".join(f"{op} (k {k})" for op, k in calibration["scaled"].items()) or "none"


def _scaled_or_int8(report: dict) -> str:
    """fp16: the matmuls scaled (their FLOPs share); int8: the int8 matmuls per graph (their FLOPs share)."""
    if "int8" in report:
        counts = ", ".join(f"{graph} {len(modules)}" for graph, modules in report["int8"]["int8"].items())
        return f"int8: {counts} ({100 * report['int8']['int8_flops_share']:.1f}%)"
    calibration = report["calibration"]
    return f"{len(calibration['scaled'])} ({100 * calibration['scaled_flops_share']:.2f}%)"


def _e2e(exported: dict) -> dict:
    return exported["report"]["results"]["end_to_end"]


HEADERS = [
    "model", "bundle", "largest", "scaled 2^-k or int8 (FLOPs)", "error max abs / cosine", "floor", "bf16", "criteria",
    "verdict", "export s", "CPU ms",
]  # fmt: skip


def sections(result: dict) -> list[str]:
    rows = []
    for label, case in result["cases"].items():
        for precision in PRECISIONS:
            exported = case.get(precision)
            if exported is None:  # a result from before int8
                continue
            if "refused" in exported:
                rows.append(
                    [label, precision, *["-"] * 6, f"refused: {exported['refused']}", f"{exported['seconds']:.0f}", "-"]
                )
                continue
            report, e2e = exported["report"], _e2e(exported)
            marks = report["yardsticks"]
            calibration = report["calibration"]
            rows.append([
                label, precision, f"{calibration['largest']:.3g}",
                _scaled_or_int8(report),
                f"{e2e['max_abs']:.3g} / {e2e['cosine']:.7f}",
                f"{marks['floor_fp64']['end_to_end']['max_abs']:.3g}", f"{marks['bf16']['end_to_end']['max_abs']:.3g}",
                ", ".join(f"{k} {v:.3g}" for k, v in report["thresholds"].items()),
                "passed" if report["passed"] else "FAILED", f"{exported['seconds']:.0f}",
                f"{exported.get('latency_ms', float('nan')):.0f}",
            ])  # fmt: skip
    cost = [
        [
            label,
            _scaled(case["fp16"]["report"]["calibration"]),
            _scaled_gflops(case["fp16"]["report"]["calibration"]),
            f"{case['fp16']['latency_ms']:.0f}" if "latency_ms" in case["fp16"] else "- (refused)",
            f"{case['fp16_without_scaling_latency_ms']:.0f}",
        ]
        for label, case in result["cases"].items()
    ]
    depth = result["depth"]
    return [
        "## fp16 at real widths: every matmul on the Cube, calibrated power-of-two scaling (`benchmarks/fp16_islands.py`)",
        f"LeRobot 0.3.3 makes a pi0 checkpoint at pi0's real widths (vision depth {depth['vision']}, language and "
        f"expert depth {depth['language']}, 2 cameras, chunk 50, 10 steps); its weights are set to a trained model's "
        "scale (matrices N(0, 1/fan_in), RMSNorm weights N(0, 0.1²), token embedding N(0, 0.03²)) and written back "
        "in LeRobot's format (`realistic`); a copy is made hot (`hot`: one projector output channel and one residual "
        "channel after the first MLP reach ~1e5, massive activations of the kind documented for Gemma/LLaMA-class "
        "models). Each exported by `pi0-export bundle` in a fresh process. Largest: the largest magnitude any tower "
        "matmul saw (input, output or weight). Scaled: matmuls computed on operands scaled by 2^-k (fp16, exact) "
        "and their share of the matmul FLOPs; for int8, the int8 matmuls per graph and their share. "
        "Error: end to end against the float32 reference (normalized actions). Floor: the model in float64 against "
        "float32; bf16: the model with bf16 towers against float32 (report.json's yardsticks). Criteria as "
        "docs/bundle.md states them. Latency: `Engine.infer` on onnxruntime on this CPU, median of 3.",
        *(
            [f"**{LEROBOT} skipped**: {result['skipped'][LEROBOT]}; the checkpoint was written by our `save_lerobot`."]
            if "skipped" in result
            else []
        ),
        grid(HEADERS, rows),
        "What the scaling costs. Every matmul is fp16 either way (none runs on the 310P's AI CPU); a scaled op adds "
        "two elementwise multiplies (x 2^-k before, x 2^k after, in fp32) on the vector side. CPU: the fp16 bundle "
        "with its scales against the same model's fp16 bundle built without them (`fp16_scaling=False`, which for "
        "the hot model fails validation: timed only). Where nothing is scaled (`realistic`) the two CPU bundles are "
        "the same graph: their difference is this machine's run-to-run noise.",
        grid(["model", "scaled (k)", "their GFLOPs / chunk", "fp16 CPU ms", "unscaled fp16 CPU ms"], cost),
    ]


def targets(result: dict) -> list[tuple[str, str, str]]:
    verdicts = [
        f"{label} {p}: {'passed' if case[p]['report']['passed'] else 'FAILED'}"
        for label, case in result["cases"].items()
        for p in ("fp32", "fp16")
    ]
    rows = [("real-width LeRobot pi0, realistic and hot, fp32 and fp16 bundles", "all pass", "; ".join(verdicts))]
    int8 = [(label, case["int8"]) for label, case in result["cases"].items() if "int8" in case]
    if int8:
        rows.append((
            "the same in int8 (CPU): validated against bf16's error, or refused with the reason",
            "validated or refused",
            "; ".join(f"{label}: {_int8_verdict(exported)}" for label, exported in int8),
        ))  # fmt: skip
    return rows


def _int8_verdict(exported: dict) -> str:
    if "refused" in exported:
        return f"refused ({exported['refused']})"
    report = exported["report"]
    if not report["passed"]:
        return f"refused by validation ({'; '.join(report['failures'])})"
    return (
        f"validated, {100 * report['int8']['int8_flops_share']:.1f}% of the FLOPs int8, {exported['latency_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main(run, SMOKE)

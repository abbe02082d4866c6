"""`pi0-export`: the host-side command line.

pi0-export inspect (--checkpoint DIR | --preset NAME)     what a checkpoint holds, and what loading costs
pi0-export sample  (--checkpoint DIR | --preset NAME)     run the PyTorch reference on an observation
pi0-export bundle  (--checkpoint DIR | --preset NAME) --out BUNDLE   export, validate and compile a bundle

Each command runs through `runtime.errors.run_command`: a user's mistake (a missing path, a directory
that is no checkpoint, a bad flag value) is one line on stderr and exit status 2. The paths and numbers a
command takes are checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ExportError
from exporter.source import add_source_arguments, check_positive, load_source, log, peak_rss_mib
from runtime.errors import run_command


def preset_tokenizer(directory: Path) -> Path:
    from exporter.tokenizer_train import train_tokenizer

    return train_tokenizer(directory / "tokenizer.model")


def check_files(flag: str, *paths: Path | None) -> None:
    """Refuse a path given to `flag` that is not a file, by flag and path (None: not given)."""
    for path in paths:
        if path is not None and not path.is_file():
            raise ExportError(f"{flag} {path}: no such file")


def cmd_inspect(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    policy = load_source(args)
    load_seconds = time.perf_counter() - start
    # Reading every weight also pages in a memory-mapped checkpoint, so the peak RSS below is real.
    start = time.perf_counter()
    nonfinite = [name for name, p in policy.model.named_parameters() if not torch.isfinite(p).all()]
    read_seconds = time.perf_counter() - start
    weights_mib = sum(p.numel() * p.element_size() for p in policy.model.parameters()) / 2**20
    spec = policy.spec
    report = {
        "framework": policy.source,
        "model_type": policy.model.dims.model_type,
        "conventions": {"name": spec.conventions, "from": list(spec.convention_set.sources)},
        **policy.details,
        "dims": asdict(policy.model.dims),
        "spec": policy.spec.to_dict(),
        "robot": None if policy.robot is None else policy.robot.to_dict(),
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "weights_mib": round(weights_mib, 1),
        "load_seconds": round(load_seconds, 2),
        "read_all_seconds": round(read_seconds, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "nonfinite_tensors": nonfinite,
    }
    print(json.dumps(report, indent=2))
    if nonfinite:
        log(f"error: {len(nonfinite)} tensor(s) hold NaN or inf, the first {nonfinite[0]}")
        return 1
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from exporter.torch_backend import reference_engine
    from runtime.engine import EngineError
    from runtime.pipeline.observation import Observation

    check_positive(args, "rows")
    check_files("--tokenizer", args.tokenizer)
    policy = load_source(args)
    spec = policy.spec
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer or (preset_tokenizer(Path(tmp)) if args.preset else None)
        reference = reference_engine(policy, tokenizer)
        obs = Observation.synthetic(reference.metadata(), seed=args.seed)  # random frames and state
        if tokenizer is None:
            log("no tokenizer (give --tokenizer PATH to PaliGemma's tokenizer.model): using a BOS-only prompt")
        else:
            obs = replace(obs, prompt=args.prompt, tokens=None, token_mask=None)
        log(f"sampling: camera(s) {list(spec.camera_keys)}, {spec.num_steps} flow steps, prompt {args.prompt!r}")
        start = time.perf_counter()
        try:
            actions = reference.infer(obs)[0]
        except EngineError as e:  # non-finite actions, most likely
            log(f"error: {e.message}")
            return 1
    log(f"action chunk {actions.shape} in {(time.perf_counter() - start) * 1e3:.0f} ms")
    np.set_printoptions(precision=4, suppress=True, linewidth=160)
    rows = min(args.rows, len(actions))
    print(f"first {rows} of {len(actions)} actions ({spec.action_dim} dims each):")
    print(actions[:rows])
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from exporter.bundle import BundleOptions, build_bundle, check_out

    check_positive(args, "num_steps")
    check_files("--tokenizer", args.tokenizer)
    check_files("--calibration", *(args.calibration or ()))
    check_out(args.out)
    tokenized_on_robot = (args.tokenizer is not None or args.preset) and not args.fixed_prompts_only
    if args.default_prompt is not None and not tokenized_on_robot and args.default_prompt not in (args.prompt or ()):
        raise ExportError(
            "--default-prompt needs a tokenizer shipped in the bundle (--tokenizer) or to be one of --prompt"
        )
    policy = load_source(args)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer or (preset_tokenizer(Path(tmp)) if args.preset else None)
        options = BundleOptions(
            precision=args.precision,
            num_steps=args.num_steps,
            tokenizer=tokenizer,
            prompts=tuple(args.prompt or ()),
            default_prompt=args.default_prompt,
            soc_version=args.soc_version,
            atc_mode=args.atc,
            validate=not args.no_validate,
            seed=args.seed,
            drop_empty_cameras=not args.keep_empty_cameras,
            fixed_prompts_only=args.fixed_prompts_only,
            calibration=tuple(args.calibration or ()),
            allow_ai_cpu=args.allow_ai_cpu,
            guidance_prompt=args.guidance_prompt,
            guidance_scale=args.guidance_scale,
        )
        start = time.perf_counter()
        build_bundle(policy, args.out, options, log=log)
    log(f"done in {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pi0-export",
        description="Turn a pi0 checkpoint (LeRobot or openpi) into something a robot can run. Nothing is downloaded.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print the inferred dimensions and data conventions of a checkpoint")
    add_source_arguments(inspect)
    inspect.set_defaults(func=cmd_inspect)

    sample = commands.add_parser(
        "sample", help="run the PyTorch reference once on a synthetic observation and print the action chunk"
    )
    add_source_arguments(sample)
    sample.add_argument("--prompt", default="transfer the cube", help="task prompt (default: %(default)r)")
    sample.add_argument(
        "--tokenizer", type=Path, metavar="PATH", help="SentencePiece tokenizer.model (presets train their own)"
    )
    sample.add_argument("--rows", type=int, default=5, help="how many actions of the chunk to print (default 5)")
    sample.set_defaults(func=cmd_sample)

    bundle = commands.add_parser(
        "bundle",
        help="export the VLM and action-expert graphs, validate them, compile them with atc, write a bundle",
        description="Export a pi0 or pi0.5 policy into a self-describing bundle directory for pi0-runtime: vlm.onnx and "
        "expert.onnx (opset 15), manifest.json (conventions, statistics, checksums), report.json (validation "
        "against the float32 PyTorch model) and, where CANN's atc is installed, Ascend OM files.",
    )
    add_source_arguments(bundle)
    bundle.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="BUNDLE",
        help="bundle directory to create (must not exist or be empty)",
    )
    bundle.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="weights' precision in the graphs: fp16 for the 310P (every matmul fp16, power-of-two scaled where "
        "calibration finds it near fp16's range; norms, softmax, RoPE, residuals fp32); int8 for CPUs only "
        "(onnxruntime; no atc, refused by the ACL backend): weight matmuls int8 (weights per output channel, "
        "activations scaled per call), except what stays fp32: attention products, the first and last "
        "projections, matmuls whose calibrated input or weight ranges hold outliers, and those beyond the bf16 "
        "run's error, measured per graph (report.json lists each and why); default fp32",
    )
    bundle.add_argument(
        "--calibration",
        nargs="+",
        type=Path,
        metavar="OBS.npz",
        help="observations (the request's field names, as `pi0-runtime infer --obs` takes) to calibrate fp16 "
        "and int8 ranges on, beside the validation inputs: frames from your robot. fp16: matmuls whose inputs "
        "or outputs reach 2^13 compute on operands scaled by 2^-k (report.json lists them and k); int8: matmuls "
        "whose ranges would make int8 rounding too coarse stay fp32",
    )
    bundle.add_argument(
        "--num-steps", type=int, metavar="N", help="flow-matching steps (default: the checkpoint's, usually 10)"
    )
    bundle.add_argument(
        "--tokenizer",
        type=Path,
        metavar="PATH",
        help="SentencePiece tokenizer.model to ship in the bundle (presets ship their own)",
    )
    bundle.add_argument(
        "--prompt",
        nargs="+",
        metavar="TEXT",
        help="prompt(s) to pre-tokenize into the manifest, for clients that send no text",
    )
    bundle.add_argument(
        "--default-prompt",
        metavar="TEXT",
        help="the prompt served to a request that sends none (default: the openpi config's default_prompt; "
        "else a --fixed-prompts-only bundle's only prompt); needs --tokenizer or to be one of --prompt",
    )
    bundle.add_argument(
        "--soc-version",
        metavar="SOC",
        help='Ascend SoC for atc: "Ascend" + the Name `npu-smi info` prints on the device, e.g. Ascend310P3 '
        "(default: from npu-smi here; without npu-smi, required to compile OM files; atc.sh reads it on the device)",
    )
    bundle.add_argument(
        "--atc",
        choices=["auto", "always", "never"],
        default="auto",
        help="compile OM files with atc: auto = when atc is on PATH; without it, atc.sh holds the commands "
        "(default auto)",
    )
    bundle.add_argument(
        "--no-validate", action="store_true", help="skip validating the graphs against PyTorch (not recommended)"
    )
    bundle.add_argument(
        "--fixed-prompts-only",
        action="store_true",
        help="serve exactly the --prompt texts: ship no tokenizer and size the language token budget to the "
        "longest of them (fewer prefix tokens, same actions)",
    )
    bundle.add_argument(
        "--allow-ai-cpu",
        action="store_true",
        help="build the bundle even where matrix ops would run on the 310P's AI CPU (a float32 MatMul/Gemm/Conv: "
        "the Cube multiplies fp16 only), in fp16 graphs or an fp32 bundle compiled to OM; by default the export "
        "refuses and names the ops",
    )
    bundle.add_argument(
        "--keep-empty-cameras",
        action="store_true",
        help="keep the checkpoint's always-empty camera slots in the VLM graph (by default they are left out: "
        "their tokens are masked, so the actions are the same at a fraction of the cost)",
    )
    bundle.add_argument(
        "--guidance-prompt",
        metavar="TEXT",
        help="classifier-free guidance with the condition in the prompt (RECAP): the conditioned prompt is the "
        "task followed by exactly TEXT (e.g. ', Advantage: positive'), the unconditioned one the task alone; "
        "both prefixes run in one batched VLM call. A checkpoint with a learned condition (condition_embedding) "
        "gets guidance without it (docs/guidance.md)",
    )
    bundle.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        metavar="BETA",
        help="the bundle's default beta: v = v_u + beta (v_c - v_u) per step; 1 = the conditioned branch alone "
        "(default 1; a request's guidance_scale overrides it)",
    )
    bundle.set_defaults(func=cmd_bundle)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), lambda message: log(f"error: {message}"))


if __name__ == "__main__":
    sys.exit(main())

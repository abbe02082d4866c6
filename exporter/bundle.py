"""Write a bundle: the two graphs, the conventions around them, and the proof that they are right.

Layout (documented in docs/bundle.md):
    manifest.json      schema version, dims, policy conventions, prompt handling, graphs, sha256 of every file
    vlm.onnx           (+ vlm.onnx.data when over 2 GB)
    expert.onnx        (+ expert.onnx.data)
    tokenizer.model    when a tokenizer was given (or the preset's own)
    report.json        validation against the float32 PyTorch model, the model's own yardsticks (float64
                       floor, bf16), the calibrated ranges and the matmuls kept float32
    <graph>.keep_dtype.cfg   ATC's --keep_dtype list: the ONNX nodes of those float32 matmuls
    om/*.om, om/*.atc.log   when compiled with atc; otherwise atc.sh with the exact commands

The bundle is assembled in `<out>.partial` and renamed into place only when everything passed, so a
half-written or failing bundle never sits where the runtime looks. A failing one is kept as
`<out>.failed` for inspection.
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from exporter import atc
from exporter.checkpoint import LoadedPolicy
from exporter.errors import ExportError
from exporter.lora import lora_forward
from exporter.onnx_export import OPSET, example_inputs, export_graphs, graph_io
from exporter.onnx_lint import lint
from exporter.precision import RangeRecorder, calibration_report, island_nodes, islands, to_precision_
from exporter.torch_backend import reference_engine
from exporter.validate import format_report, reference, validate, yardstick_bytes, yardsticks
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import (
    MANIFEST,
    OM,
    CompiledTarget,
    FixedPrompt,
    GraphEntry,
    Manifest,
    PromptSection,
    load_bundle,
    sha256_file,
)
from runtime.bundle.spec import PolicySpec
from runtime.errors import ApplianceError
from runtime.npu import detect_soc
from runtime.pipeline.model_io import ModelInputs
from runtime.pipeline.observation import Observation
from runtime.pipeline.tokenizer import PromptTokenizer, StatePromptTable

EXPORTER_VERSION = "0.1.0"


class BundleBuildError(ExportError):
    """The bundle could not be written, or it failed validation or lint."""


@dataclass(frozen=True)
class BundleOptions:
    precision: str = "fp32"
    num_steps: int | None = None
    tokenizer: Path | None = None
    prompts: tuple[str, ...] = ()
    soc_version: str | None = None
    atc_mode: str = "auto"  # auto | always | never
    validate: bool = True
    seed: int = 0
    # Leave the checkpoint's always-empty camera slots out of the graphs: their tokens are masked out
    # of every attention and do not advance positions, so the actions are the same (validation checks
    # it against the model run with them) at a fraction of the cost.
    drop_empty_cameras: bool = True
    # Serve the `prompts` only: ship no tokenizer, and size the language token budget to the longest
    # of them (padding is masked, so the actions are the same; validation checks it).
    fixed_prompts_only: bool = False
    # Observations (OBS.npz, the request's field names) to calibrate fp16 ranges on, beside the
    # validation's own inputs: frames from the robot or from `pi0-sim record`.
    calibration: tuple[Path, ...] = ()
    # False: every tower matmul in fp16 whatever calibration found. Only for measuring what the islands
    # cost; such a bundle fails validation wherever they were needed.
    fp32_islands: bool = True


def prompt_tokenizer(spec: PolicySpec, options: BundleOptions) -> PromptTokenizer:
    try:
        return PromptTokenizer(
            options.tokenizer, spec.tokenizer_max_length, spec.convention_set.prompt, spec.state_in_prompt
        )
    except RuntimeError as e:  # sentencepiece's word for a file that is not a model
        raise BundleBuildError(f"tokenizer {options.tokenizer} is not a SentencePiece model ({e})") from e


def _fixed_prompt(spec: PolicySpec, tokenizer: PromptTokenizer, prompt: str) -> FixedPrompt:
    """A prompt tokenized now; for a state-in-prompt policy (pi0.5), the table of its tokens for any state."""
    try:
        if not spec.state_in_prompt:
            tokens, mask = tokenizer(prompt)
            return FixedPrompt(prompt, tokens[0].tolist(), mask[0].tolist())
        table = StatePromptTable.build(tokenizer, prompt, spec.prompt_state_dim)
    except ValueError as e:  # longer than the token budget; for pi0.5, tokens that depend on the state
        hint = "; ship the tokenizer instead (leave out --fixed-prompts-only)" if spec.state_in_prompt else ""
        raise BundleBuildError(f"{e}{hint}") from e
    return FixedPrompt(prompt, state_table=table.to_dict())


def _prompt_section(spec: PolicySpec, options: BundleOptions, work: Path) -> PromptSection:
    section = PromptSection(style=spec.convention_set.prompt, max_length=spec.tokenizer_max_length, tokenizer=None)
    if options.tokenizer is None:
        if options.prompts:
            raise BundleBuildError("--prompt needs a tokenizer (--tokenizer PATH) to tokenize it at export")
        return section
    tokenizer = prompt_tokenizer(spec, options)
    if not options.fixed_prompts_only:
        shutil.copyfile(options.tokenizer, work / "tokenizer.model")
        section.tokenizer = "tokenizer.model"
    section.fixed = [_fixed_prompt(spec, tokenizer, prompt) for prompt in options.prompts]
    return section


def token_budget(spec: PolicySpec, options: BundleOptions) -> int:
    """The language tokens the graphs take: the checkpoint's budget, or with `fixed_prompts_only` the
    longest fixed prompt's length (for pi0.5, with the longest state)."""
    if not options.fixed_prompts_only:
        return spec.tokenizer_max_length
    if not options.prompts or options.tokenizer is None:
        raise BundleBuildError("--fixed-prompts-only needs --prompt and a tokenizer to tokenize them at export")
    tokenizer = prompt_tokenizer(spec, options)
    if spec.state_in_prompt:
        lengths = [StatePromptTable.from_dict(_fixed_prompt(spec, tokenizer, p).state_table) for p in options.prompts]
        return min(spec.tokenizer_max_length, max(t.longest(spec.prompt_state_dim) for t in lengths))
    return max(sum(_fixed_prompt(spec, tokenizer, prompt).mask) for prompt in options.prompts)


def _graph_entry(files: list[Path]) -> GraphEntry:
    return GraphEntry(onnx=files[0].name, onnx_data=files[1].name if len(files) > 1 else None, **graph_io(files[0]))


def check_out(out: str | Path) -> Path:
    """`out` as a bundle directory to create: absent or empty, else a BundleBuildError naming it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleBuildError(f"{out} exists and is not an empty directory; choose another --out")
    return out


def build_bundle(
    policy: LoadedPolicy, out: str | Path, options: BundleOptions, log: Callable[[str], None] = print
) -> Path:
    """Export `policy` into the bundle directory `out`.

    Consumes the policy's model: it is cast in place to the export precision, and released
    (`policy.model = None`) once the graphs are written, so that validation does not hold the PyTorch
    model and the onnxruntime sessions at once (for the full pi0: 6 GB each in fp16).
    """
    out = check_out(out)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    full_spec = replace(policy.spec, num_steps=options.num_steps or policy.spec.num_steps)
    spec = replace(
        full_spec,
        empty_cameras=0 if options.drop_empty_cameras else full_spec.empty_cameras,
        tokenizer_max_length=token_budget(full_spec, options),
    )
    model = policy.model

    log("[1/5] the float32 reference, calibrating fp16 ranges ...")
    x = example_inputs(full_spec, model, options.seed, real_tokens=min(spec.tokenizer_max_length, 7))
    inputs = ModelInputs(x["images"], x["image_masks"], x["tokens"], x["token_mask"], x["state"])
    # The reference is the model as the checkpoint defines it, empty camera slots included.
    with RangeRecorder(model) as recorder:
        ref = reference(model, inputs, x["noise"], full_spec.num_steps)
        _calibrate_on(policy, options, log)
    kept = islands(recorder.ranges) if options.precision == "fp16" and options.fp32_islands else []
    calibration = calibration_report(recorder.ranges, kept, 1 + len(options.calibration), full_spec.num_steps)
    log(
        f"      largest matmul magnitude {calibration['largest']:.3g} (fp16 max 65504); "
        + (
            f"{len(kept)} of {len(recorder.ranges)} matmuls kept float32 "
            f"({100 * calibration['kept_flops_share']:.2f}% of {calibration['matmul_gflops_per_inference']:.3g} GFLOPs)"
            if options.precision == "fp16"
            else "fp32 export: nothing to keep"
        )
    )
    marks, skipped = None, None
    if options.validate:
        need, available = yardstick_bytes(model), memory_available()
        if available is not None and need * 1.25 > available:
            skipped = (
                f"a float64 copy of the weights needs {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB are available"
            )
            log(f"      the model's own yardsticks skipped ({skipped}): absolute criteria apply")
        else:
            log("      the model's own yardsticks: float64 (its float32 floor) and bf16 ...")
            marks = yardsticks(model, ref)
    lora_ref = None
    if options.validate and policy.adapters is not None:  # the unmerged LoRA forward, to prove the merge
        with lora_forward(model, policy.adapters):
            lora_ref = reference(model, inputs, x["noise"], full_spec.num_steps)
        log(
            f"      LoRA: {len(policy.adapters.adapters)} adapters merged; the bundle is also checked against the unmerged forward"
        )
    if full_spec.empty_cameras != spec.empty_cameras:
        log(f"      the graphs leave out the {full_spec.empty_cameras} always-empty camera slot(s)")
    if full_spec.tokenizer_max_length != spec.tokenizer_max_length:
        log(
            f"      language budget {spec.tokenizer_max_length} tokens (the checkpoint's: {full_spec.tokenizer_max_length})"
        )

    log(f"[2/5] exporting vlm.onnx and expert.onnx ({options.precision}, opset {OPSET}) ...")
    to_precision_(model, options.precision, kept)
    files = export_graphs(model, spec, work, options.seed)
    keep_dtype = {}
    for name, paths in files.items():
        problems = lint(paths[0])
        if problems:
            raise BundleBuildError(f"{name}.onnx fails the ATC lint: " + "; ".join(problems))
        log(f"      {name}.onnx: {sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB, lint clean")
        nodes = island_nodes(paths[0], model, kept)
        if nodes:
            keep_dtype[name] = f"{name}.keep_dtype.cfg"
            (work / keep_dtype[name]).write_text("\n".join(nodes) + "\n")
            log(f"      {name}: {len(nodes)} nodes kept float32, listed in {keep_dtype[name]} for atc")

    soc = options.soc_version or detect_soc() or atc.DEFAULT_SOC
    commands = {
        name: atc.atc_command(paths[0].name, f"om/{name}", soc, keep_dtype.get(name)) for name, paths in files.items()
    }
    dims = model.dims
    policy.model = model = None  # the graphs are written; the reference outputs are all validation needs
    manifest = Manifest(
        source=policy.source,
        precision=options.precision,
        model=asdict(dims),
        policy=spec,
        prompt=_prompt_section(spec, options, work),
        compiled={OM: CompiledTarget(device=soc)},
        graphs={name: _graph_entry(paths) for name, paths in files.items()},
        exporter={
            "version": EXPORTER_VERSION,
            "torch": torch.__version__,
            "opset": OPSET,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        checkpoint=policy.details,
        empty_cameras_dropped=full_spec.empty_cameras - spec.empty_cameras,
        checkpoint_token_budget=full_spec.tokenizer_max_length,
    )
    _write_manifest(work, manifest)

    if options.validate:
        log("[3/5] validating the graphs with onnxruntime against PyTorch ...")
        backend = OnnxRuntimeBackend(load_bundle(work, verify=False))
        report = validate(backend, ref, options.precision, spec, marks, lora_ref)
        report["calibration"] = calibration
        if skipped:
            report["yardsticks_skipped"] = skipped
        (work / "report.json").write_text(json.dumps(report, indent=2))
        manifest.validation = "report.json"
        log(format_report(report))
        if not report["passed"]:
            failed = out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            _write_manifest(work, manifest)
            work.rename(failed)
            raise BundleBuildError(f"validation failed; the bundle is kept for inspection in {failed}")
    else:
        (work / "report.json").write_text(json.dumps({"passed": None, "calibration": calibration}, indent=2))
        log("[3/5] validation skipped (--no-validate)")

    use_atc = options.atc_mode == "always" or (options.atc_mode == "auto" and shutil.which("atc"))
    if use_atc:
        log(f"[4/5] compiling with atc for {soc} ...")
        oms = atc.compile_graphs(work, commands, log)
        manifest.compiled[OM].files = {name: om.relative_to(work).as_posix() for name, om in oms.items()}
    else:
        script = atc.write_script(work, commands)
        manifest.compiled[OM].script = script.name
        log(
            f"[4/5] atc not run ({'--atc never' if options.atc_mode == 'never' else 'not on PATH'}): "
            f"the exact commands are in {out / script.name}"
        )

    log("[5/5] writing the manifest ...")
    _write_manifest(work, manifest)
    if out.exists():
        out.rmdir()
    work.rename(out)
    log(f"bundle written to {out}")
    return out


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _calibrate_on(policy: LoadedPolicy, options: BundleOptions, log: Callable[[str], None]) -> None:
    """Run the float32 reference on the user's calibration observations (under the caller's recorder)."""
    if not options.calibration:
        return
    engine = reference_engine(policy, options.tokenizer)
    for path in options.calibration:
        try:
            engine.infer(Observation.from_npz(path))
        except (ApplianceError, ValueError, OSError) as e:  # not an observation, or one the engine refuses
            raise BundleBuildError(f"calibration observation {path}: {e}") from e
    log(f"      calibrated on {len(options.calibration)} observation(s) of yours as well")


def _write_manifest(work: Path, manifest: Manifest) -> None:
    """Record the sha256 of every file in the bundle, then write manifest.json."""
    manifest.files = {
        path.relative_to(work).as_posix(): sha256_file(path)
        for path in sorted(work.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest.write(work)

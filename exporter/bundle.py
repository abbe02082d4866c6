"""Write a bundle: the two graphs, the conventions around them, and the proof that they are right.

Layout (documented in docs/bundle.md):
    manifest.json      schema version, dims, policy conventions, prompt handling, graphs, sha256 of every file
    vlm.onnx           (+ vlm.onnx.data when over 2 GB)
    expert.onnx        (+ expert.onnx.data)
    tokenizer.model    when a tokenizer was given (or the preset's own)
    report.json        validation against the float32 PyTorch model, the model's own yardsticks (float64
                       floor, bf16), the calibrated ranges and the matmuls scaled by powers of two
    om/*.om, om/*.atc.log   when compiled with atc (om/*.json: what `atc --mode=1` reports; om/weight/: the
                            weights of graphs with ONNX external data); otherwise atc.sh with the exact commands

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

from exporter import atc, int8
from exporter.checkpoint import LoadedPolicy
from exporter.errors import ExportError
from exporter.lora import lora_forward
from exporter.onnx_export import OPSET, export_graphs, graph_io
from exporter.onnx_lint import float32_cube_ops, lint
from exporter.precision import RangeRecorder, calibration_report, scales, to_precision_
from exporter.torch_backend import reference_engine
from exporter.validate import (
    VALIDATION_SCALE,
    format_report,
    guided_reference,
    reference,
    thresholds,
    validate,
    validation_request,
    yardstick_bytes,
    yardsticks,
)
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.guidance import LEARNED_CONDITION, PROMPT_CONDITION, Guidance, check_scale
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
    default_prompt: str | None = None  # served to a request with none (else the training config's, if any)
    # Observations (OBS.npz, the request's field names) to calibrate fp16 ranges on, beside the
    # validation's own inputs: frames from the robot or from `pi0-sim record`.
    calibration: tuple[Path, ...] = ()
    # False: every matmul in plain fp16 whatever calibration found (no power-of-two scales). Only for
    # measuring what the scaling costs; such a bundle fails validation wherever it was needed.
    fp16_scaling: bool = True
    # An fp16 bundle whose graphs still hold a float32 MatMul/Gemm/Conv (the 310P's Cube has no float32:
    # it would run on the AI CPU) is refused unless this is set.
    allow_ai_cpu: bool = False
    # Classifier-free guidance (docs/guidance.md): the condition in the prompt, as the text appended to the
    # task (a model with a learned condition has guidance without it), and the default beta.
    guidance_prompt: str | None = None
    guidance_scale: float = 1.0


def guidance_plan(policy: LoadedPolicy, options: BundleOptions) -> Guidance | None:
    """The bundle's guidance: a learned condition where the checkpoint has one, else the condition text
    given, else none (and then no scale but 1)."""
    learned = policy.model.dims.condition is not None
    try:
        if learned and options.guidance_prompt is not None:
            raise BundleBuildError(
                "this checkpoint has a learned condition (condition_embedding): its guidance needs no --guidance-prompt"
            )
        if learned:
            return Guidance(LEARNED_CONDITION, options.guidance_scale)
        if options.guidance_prompt is not None:
            if not options.guidance_prompt.strip():
                raise BundleBuildError("--guidance-prompt is empty: give the text that conditions the prompt")
            return Guidance(PROMPT_CONDITION, options.guidance_scale, options.guidance_prompt)
        check_scale(options.guidance_scale, "--guidance-scale")
    except ValueError as e:
        raise BundleBuildError(str(e)) from e
    if options.guidance_scale != 1.0:
        raise BundleBuildError(
            "--guidance-scale needs a condition: --guidance-prompt TEXT, or a checkpoint with a learned condition"
        )
    return None


def with_conditioned_prompts(options: BundleOptions, guidance: Guidance | None) -> BundleOptions:
    """A condition in the prompt: each fixed prompt's conditioned form is tokenized at export as well."""
    if guidance is None or guidance.kind != PROMPT_CONDITION:
        return options
    conditioned = tuple(guidance.conditioned(p) for p in options.prompts)
    return replace(options, prompts=(*options.prompts, *(p for p in conditioned if p not in options.prompts)))


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


def _prompt_section(
    spec: PolicySpec,
    options: BundleOptions,
    work: Path,
    default: str | None,
    log: Callable[[str], None],
    tasks: tuple[str, ...],
) -> PromptSection:
    """`tasks`: the prompts given (`options.prompts` may hold guidance's conditioned forms of them too)."""
    section = PromptSection(style=spec.convention_set.prompt, max_length=spec.tokenizer_max_length, tokenizer=None)
    if options.tokenizer is None:
        if options.prompts:
            raise BundleBuildError("--prompt needs a tokenizer (--tokenizer PATH) to tokenize it at export")
    else:
        tokenizer = prompt_tokenizer(spec, options)
        if not options.fixed_prompts_only:
            shutil.copyfile(options.tokenizer, work / "tokenizer.model")
            section.tokenizer = "tokenizer.model"
        section.fixed = [_fixed_prompt(spec, tokenizer, prompt) for prompt in options.prompts]
    given = [p for p in section.fixed if p.text in tasks]
    section.default = default_prompt(replace(section, fixed=given), options.default_prompt, default, log)
    return section


def _config_prompt(policy: LoadedPolicy) -> str | None:
    return policy.robot.default_prompt if policy.robot is not None else None


def default_prompt(
    section: PromptSection, given: str | None, configured: str | None, log: Callable[[str], None]
) -> str | None:
    """The prompt served when a request has none: the one given (`--default-prompt`, else the training
    config's: openpi's `default_prompt`), else a fixed-prompt bundle's only prompt; only where the bundle
    can tokenize it."""
    fixed = [p.text for p in section.fixed]
    if given is not None:
        if section.tokenizer is None and given not in fixed:
            raise BundleBuildError("--default-prompt needs a tokenizer (--tokenizer PATH) or to be one of --prompt")
        return given
    if configured is None:
        return fixed[0] if section.tokenizer is None and len(fixed) == 1 else None
    if section.tokenizer is None and configured not in fixed:
        log(
            f"      note: the training config's default prompt {configured!r} needs a tokenizer (--tokenizer) or "
            "--prompt with it; requests without a prompt will be refused"
        )
        return None
    return configured


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


def atc_plan(options: BundleOptions) -> tuple[bool, str | None]:
    """(whether atc runs here, the SoC to compile for), checked before anything is exported: OM
    compilation needs a SoC from `--soc-version` or npu-smi (no guess), and an fp32 bundle compiled
    to OM is refused unless `allow_ai_cpu` (the 310P's Cube has no fp32: every matmul would run on
    the AI CPU under --precision_mode_v2=origin, docs/cann-facts.md §3, §8)."""
    on_path = shutil.which("atc") is not None
    use_atc = options.atc_mode == "always" or (options.atc_mode == "auto" and on_path)
    soc = options.soc_version or detect_soc()
    if options.soc_version is not None and not options.soc_version.startswith("Ascend"):
        raise BundleBuildError(
            f"--soc-version {options.soc_version}: expected Ascend + npu-smi's Name, e.g. Ascend310P3"
        )
    if not use_atc:
        return False, soc
    if options.precision == int8.INT8:
        raise int8.Int8Error(
            "an int8 bundle is for the CPU (onnxruntime) backend only: ATC does not compile onnxruntime's int8 "
            "operators (the 310P's int8 path is CANN's AMCT); use --atc never, or --precision fp16 for the 310P"
        )
    if not on_path:
        raise atc.AtcError("atc is not on PATH (source CANN's set_env.sh, or use --atc auto|never)")
    if soc is None:
        raise BundleBuildError(
            f"compiling OM files needs the device's SoC, and npu-smi is not here: give --soc-version ({atc.SOC_RULE}), "
            "or use --atc never and run the bundle's atc.sh on the device"
        )
    if options.precision == "fp32" and not options.allow_ai_cpu:
        raise BundleBuildError(
            f"an fp32 bundle compiled for {soc} would run every matmul on the AI CPU (the 310P's Cube has no "
            "float32; atc keeps fp32 under --precision_mode_v2=origin): export --precision fp16, or --atc never "
            "for ONNX only, or --allow-ai-cpu to compile it anyway"
        )
    return True, soc


def _record_placement(
    work: Path,
    oms: dict[str, atc.CompiledGraph],
    options: BundleOptions,
    out: Path,
    manifest: Manifest,
    log: Callable[[str], None],
) -> None:
    """What atc reports (`atc --mode=1`): the SoC and the AI CPU ops per graph, into report.json's "om"
    section; an fp16 bundle with AI CPU matmuls is refused unless `allow_ai_cpu` (kept as .failed)."""
    section = {
        name: {"om": c.om.relative_to(work).as_posix(), "soc_version": c.soc_version, "ai_cpu_ops": c.ai_cpu_ops}
        for name, c in oms.items()
    }
    report_file = work / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    report["om"] = section
    report_file.write_text(json.dumps(report, indent=2))
    matrix = {name: c.ai_cpu_matrix_ops for name, c in oms.items() if c.ai_cpu_matrix_ops}
    for c in oms.values():
        log(
            f"      {c.om.relative_to(work)}: soc_version {c.soc_version}, {len(c.ai_cpu_ops)} op(s) on the AI CPU"
            + (f" ({len(c.ai_cpu_matrix_ops)} matmul/conv)" if c.ai_cpu_matrix_ops else "")
        )
    if not matrix:
        return
    listing = "; ".join(
        f"{name}: " + ", ".join(f"{op['name']} ({op['type']})" for op in ops[:5]) + (" ..." if len(ops) > 5 else "")
        for name, ops in matrix.items()
    )
    if options.allow_ai_cpu:  # an fp32 bundle is compiled only with it (atc_plan)
        log(f"      warning: matrix ops on the AI CPU (allowed by --allow-ai-cpu): {listing}")
        return
    failed = _keep_failed(work, manifest, out)
    raise BundleBuildError(
        f"atc placed matrix ops of this fp16 bundle on the AI CPU ({listing}); om/<graph>.json has every op's "
        f"engine. --allow-ai-cpu accepts that; the bundle is kept for inspection in {failed}"
    )


def _held_out_line(section: dict) -> str:
    mean = section["mean"]
    figures = "; ".join(
        f"{f} {mean['int8'][f]['max_abs']:.3g} vs {mean['bf16'][f]['max_abs']:.3g}" for f in int8.FIGURES
    )
    return f"      int8 on {len(section['requests'])} held-out requests (measured, not judged), mean max abs int8 vs bf16: {figures}"


def build_bundle(
    policy: LoadedPolicy, out: str | Path, options: BundleOptions, log: Callable[[str], None] = print
) -> Path:
    """Export `policy` into the bundle directory `out`.

    Consumes the policy's model: it is cast in place to the export precision, and released
    (`policy.model = None`) once the graphs are written, so that validation does not hold the PyTorch
    model and the onnxruntime sessions at once (for the full pi0: 6 GB each in fp16).
    """
    out = check_out(out)
    use_atc, soc = atc_plan(options)
    in_int8 = options.precision == int8.INT8
    if in_int8 and not options.validate:
        raise int8.Int8Error("an int8 bundle's matmuls are chosen by validation: --no-validate cannot make one")
    guidance = guidance_plan(policy, options)
    given_prompts = options.prompts
    options = with_conditioned_prompts(options, guidance)
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

    log(f"[1/5] the float32 reference, calibrating {'int8' if in_int8 else 'fp16'} ranges ...")
    inputs, noise = validation_request(full_spec, spec, model, options.seed)
    # The reference is the model as the checkpoint defines it, empty camera slots included.
    with (int8.Int8Recorder if in_int8 else RangeRecorder)(model) as recorder:
        ref = reference(model, inputs, noise, full_spec.num_steps)
        # guidance's unconditioned branch too (its own prompt, or the learned condition's other row)
        guided_ref = guided_reference(model, ref, guidance.kind) if guidance is not None else None
        _calibrate_on(policy, options, log)
    scaled = scales(recorder.ranges) if options.precision == "fp16" else {}
    if not options.fp16_scaling:
        scaled = {}
    calibration = calibration_report(recorder.ranges, scaled, 1 + len(options.calibration), full_spec.num_steps)
    int8_plan = int8.plan(model, recorder) if in_int8 else None
    log(
        f"      largest matmul magnitude {calibration['largest']:.3g} (fp16 max 65504); "
        + (
            f"{len(scaled)} of {len(recorder.ranges)} matmuls scaled by powers of two "
            f"({100 * calibration['scaled_flops_share']:.2f}% of {calibration['matmul_gflops_per_inference']:.3g} GFLOPs)"
            if options.precision == "fp16"
            else f"int8: {len(int8_plan.candidates)} candidate matmuls, {len(int8_plan.fp32)} kept fp32 by rule or range"
            if int8_plan is not None
            else "fp32 export: nothing to scale"
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
    held: list[int8.HeldOut] = []
    if in_int8 and marks is not None:
        log(
            f"      int8: {int8.HELD_OUT} held-out requests (the search never sees them), their references and yardsticks ..."
        )
        held = int8.held_out_references(model, full_spec, spec, options.seed)
    lora_ref = None
    if options.validate and policy.adapters is not None:  # the unmerged LoRA forward, to prove the merge
        with lora_forward(model, policy.adapters):
            lora_ref = reference(model, inputs, noise, full_spec.num_steps)
        log(
            f"      LoRA: {len(policy.adapters.adapters)} adapters merged; the bundle is also checked against the unmerged forward"
        )
    if guided_ref is not None:
        log(f"      guidance: the two branches computed apart, as its definition reads (beta {VALIDATION_SCALE:g})")
    if full_spec.empty_cameras != spec.empty_cameras:
        log(f"      the graphs leave out the {full_spec.empty_cameras} always-empty camera slot(s)")
    if full_spec.tokenizer_max_length != spec.tokenizer_max_length:
        log(
            f"      language budget {spec.tokenizer_max_length} tokens (the checkpoint's: {full_spec.tokenizer_max_length})"
        )

    graphs = "vlm, expert" + (", vlm_guided" if guidance and guidance.kind == PROMPT_CONDITION else "")
    graphs += f", expert_guided: guidance, default beta {guidance.default_scale:g}" if guidance else ""
    log(f"[2/5] exporting the graphs ({graphs}; {options.precision}, opset {OPSET}) ...")
    to_precision_(model, "fp32" if in_int8 else options.precision, scaled)  # int8: quantized once exported
    files = export_graphs(model, spec, work, options.seed, guidance.kind if guidance else None)
    for name, paths in files.items():
        problems = lint(paths[0])
        if problems:
            raise BundleBuildError(f"{name}.onnx fails the ATC lint: " + "; ".join(problems))
        log(f"      {name}.onnx: {sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB, lint clean")
    if options.precision == "fp16":
        calibration["float32_cube_ops"] = _check_cube(files, options, log)

    # External ONNX data (a graph over protobuf's 2 GB): the OM's weights go to om/weight/ as well.
    commands = {
        name: atc.atc_command(paths[0].name, f"om/{name}", soc or "", len(paths) > 1) for name, paths in files.items()
    }
    dims = model.dims
    digests = int8.weight_digests(model) if in_int8 else {}
    policy.model = model = None  # the graphs are written; the reference outputs are all validation needs
    manifest = Manifest(
        source=policy.source,
        precision=options.precision,
        model=asdict(dims),
        policy=spec,
        prompt=_prompt_section(spec, options, work, _config_prompt(policy), log, given_prompts),
        robot=policy.robot,
        guidance=guidance,
        compiled={} if in_int8 else {OM: CompiledTarget(device=soc or "")},  # "": atc.sh reads it where it runs
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
    if int8_plan is not None:
        limits = {graph: thresholds(int8.INT8, marks, graph) for graph in (*int8.SEARCHED, "end_to_end")}
        int8_section = int8.quantize_bundle(work, files, int8_plan, digests, ref, spec, limits, log)
        int8_section["int8_flops_share"] = int8.flops_share(int8_section, calibration, full_spec.num_steps)
        log(f"      int8: {100 * int8_section['int8_flops_share']:.1f}% of the matmul FLOPs, ops {int8_section['ops']}")

    if options.validate:
        log("[3/5] validating the graphs with onnxruntime against PyTorch ...")
        backend = OnnxRuntimeBackend(load_bundle(work, verify=False))
        report = validate(backend, ref, options.precision, spec, marks, lora_ref, guided_ref)
        if held and report["passed"]:
            int8_section["held_out"] = int8.held_out(backend, held, spec)
            log(_held_out_line(int8_section["held_out"]))
        backend.close()
        report["calibration"] = calibration
        if skipped:
            report["yardsticks_skipped"] = skipped
        if int8_plan is not None:
            report["int8"] = int8_section
            if report["passed"]:
                int8_section["served"] = int8.served_chunk(work, options.seed)
        (work / "report.json").write_text(json.dumps(report, indent=2))
        manifest.validation = "report.json"
        log(format_report(report))
        if not report["passed"]:
            failed = _keep_failed(work, manifest, out)
            raise BundleBuildError(
                f"validation failed ({'; '.join(report['failures'])}); the bundle is kept for inspection in {failed}"
            )
    else:
        (work / "report.json").write_text(json.dumps({"passed": None, "calibration": calibration}, indent=2))
        log("[3/5] validation skipped (--no-validate)")

    if use_atc:
        how = "--soc-version" if options.soc_version else "npu-smi"
        log(f"[4/5] compiling with atc for {soc} (from {how}) ...")
        oms = atc.compile_graphs(work, commands, log)
        manifest.compiled[OM].files = {name: c.om.relative_to(work).as_posix() for name, c in oms.items()}
        _record_placement(work, oms, options, out, manifest, log)
    elif in_int8:
        log("[4/5] no atc: an int8 bundle is for the CPU (onnxruntime) backend only")
    else:
        script = atc.write_script(work, commands, soc, fp32=options.precision == "fp32")
        manifest.compiled[OM].script = script.name
        target = soc or "the SoC npu-smi names where it runs (or ./atc.sh SOC)"
        log(
            f"[4/5] atc not run ({'--atc never' if options.atc_mode == 'never' else 'not on PATH'}): "
            f"the exact commands are in {out / script.name}, for {target}"
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


def _check_cube(files: dict[str, list[Path]], options: BundleOptions, log: Callable[[str], None]) -> dict:
    """{graph: its float32 Cube ops} of an fp16 bundle (`float32_cube_ops`); refused where there are
    any, unless `allow_ai_cpu`."""
    found = {name: ops for name, paths in files.items() if (ops := float32_cube_ops(paths[0]))}
    if not found:
        log("      every MatMul/Gemm/Conv takes float16 operands (the 310P's Cube)")
        return {}
    listed = "; ".join(f"{name}.onnx: {', '.join(ops)}" for name, ops in found.items())
    if not options.allow_ai_cpu:
        raise BundleBuildError(
            f"the fp16 graphs hold float32 matrix ops, which would run on the 310P's AI CPU, not its Cube: "
            f"{listed} (--allow-ai-cpu builds the bundle all the same)"
        )
    log(f"      warning (--allow-ai-cpu): float32 matrix ops that will run on the 310P's AI CPU: {listed}")
    return found


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


def _keep_failed(work: Path, manifest: Manifest, out: Path) -> Path:
    """A refused bundle, manifest written, moved to `<out>.failed` for inspection (replacing an older one)."""
    failed = out.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    _write_manifest(work, manifest)
    work.rename(failed)
    return failed


def _write_manifest(work: Path, manifest: Manifest) -> None:
    """Record the sha256 of every file in the bundle, then write manifest.json."""
    manifest.files = {
        path.relative_to(work).as_posix(): sha256_file(path)
        for path in sorted(work.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest.write(work)

"""The exporter: graphs, fp16 on the Cube (power-of-two scaling), validation, the ATC lint and compile
step, the bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURES, GOLDEN_CHECKPOINTS, QUIET, Golden, altered_copy
from onnx import TensorProto, helper

from exporter.atc import AtcError
from exporter.bundle import BundleBuildError, BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.onnx_lint import float32_cube_ops, lint
from exporter.presets import build_preset
from exporter.validate import compare
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import OM, BundleError, CompiledTarget, load_bundle
from runtime.engine import sample
from runtime.pipeline.model_io import model_state, postprocess, preprocess


@pytest.fixture(scope="module", params=[(name, p) for name in GOLDEN_CHECKPOINTS for p in ("fp32", "fp16")], ids=str)
def fixture_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name, precision = request.param
    out = tmp_path_factory.mktemp("bundles") / f"{name}-{precision}"
    build_bundle(load_checkpoint(FIXTURES / name / "checkpoint"), out, BundleOptions(precision=precision), **QUIET)
    return Golden(name), precision, out


def run_bundle(bundle_dir: Path, golden: Golden) -> np.ndarray:
    """The golden observation through the bundle alone: runtime transforms, onnxruntime graphs, Euler loop."""
    bundle = load_bundle(bundle_dir)
    state = model_state(bundle.spec, golden.state)
    inputs = preprocess(bundle.spec, golden.images, state, golden.tokens, golden.token_mask)
    x = sample(OnnxRuntimeBackend(bundle), inputs, golden.noise, bundle.spec.num_steps)
    return postprocess(bundle.spec, x)


def test_bundle_graphs_reproduce_lerobot(fixture_bundle) -> None:
    golden, precision, out = fixture_bundle
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["precision"] == precision
    actions = run_bundle(out, golden)
    m = compare(actions, golden.actions_fp32)
    print(f"\n{golden.name} {precision} bundle vs LeRobot fp32: {m}")
    if precision == "fp32":
        assert m["max_abs"] <= 1e-4
    else:
        assert m["cosine"] >= 0.999 and m["mean_abs"] <= 1e-2


def test_leaving_out_empty_cameras_changes_nothing_but_cost(tmp_path: Path) -> None:
    """The aloha-sim fixture (2 always-empty slots) exported with and without them: same actions (and
    both match LeRobot's, which ran with them: test_bundle_graphs_reproduce_lerobot)."""
    golden = Golden("lerobot-pi0-tiny-aloha-sim")
    outs = {}
    for keep in (True, False):
        out = tmp_path / f"keep-{keep}"
        build_bundle(load_checkpoint(golden.checkpoint), out, BundleOptions(drop_empty_cameras=not keep), **QUIET)
        outs[keep] = out
    kept, dropped = (json.loads((outs[k] / "manifest.json").read_text())["graphs"]["vlm"] for k in (True, False))
    assert kept["inputs"][0]["shape"][1] == 3 and dropped["inputs"][0]["shape"][1] == 1
    assert kept["outputs"][0]["shape"][2] == 3 * 256 + 12 and dropped["outputs"][0]["shape"][2] == 256 + 12
    m = compare(run_bundle(outs[False], golden), run_bundle(outs[True], golden))
    assert m["max_abs"] <= 1e-5, m


def test_fixed_prompts_only_sizes_the_token_budget(tmp_path: Path) -> None:
    """A bundle serving one fixed prompt: no tokenizer shipped, a 4-token budget instead of 12, the
    same actions as the full-budget bundle for that prompt; other prompts are refused."""
    from exporter.tokenizer_train import train_tokenizer
    from runtime.engine import EngineError, Prompts

    golden = Golden("lerobot-pi0-tiny-aloha-sim")
    tokenizer = train_tokenizer(tmp_path / "tokenizer.model", vocab_size=320)
    outs = {}
    for only in (False, True):
        options = BundleOptions(tokenizer=tokenizer, prompts=("pick",), fixed_prompts_only=only)
        outs[only] = build_bundle(load_checkpoint(golden.checkpoint), tmp_path / f"only-{only}", options, **QUIET)
    manifest = json.loads((outs[True] / "manifest.json").read_text())
    assert manifest["policy"]["tokenizer_max_length"] == 4 and manifest["checkpoint_token_budget"] == 12
    assert manifest["prompt"]["tokenizer"] is None and "tokenizer.model" not in manifest["files"]
    assert manifest["graphs"]["vlm"]["outputs"][0]["shape"][2] == 256 + 4
    actions = {}
    for only, out in outs.items():
        bundle = load_bundle(out)
        tokens, mask = Prompts.from_bundle(bundle)("pick")
        inputs = preprocess(bundle.spec, golden.images, model_state(bundle.spec, golden.state), tokens, mask)
        actions[only] = postprocess(bundle.spec, sample(OnnxRuntimeBackend(bundle), inputs, golden.noise, 10))
    assert compare(actions[True], actions[False])["max_abs"] <= 1e-5
    with pytest.raises(EngineError, match="no tokenizer"):
        Prompts.from_bundle(load_bundle(outs[True]))("place")


def test_fp16_bundles_keep_every_matmul_on_the_cube(fixture_bundle) -> None:
    """No MatMul/Gemm/Conv of an fp16 bundle takes a float32 operand (the 310P would run it on its AI
    CPU); the check itself sees the fp32 bundle's, where every one is float32."""
    _, precision, out = fixture_bundle
    ops = {name: float32_cube_ops(out / f"{name}.onnx") for name in ("vlm", "expert")}
    if precision == "fp32":
        assert all(ops.values()), ops
    else:
        assert ops == {"vlm": [], "expert": []}, ops
        assert json.loads((out / "report.json").read_text())["calibration"]["float32_cube_ops"] == {}


def optimized_op_counts(graph: Path, tmp_path: Path) -> Counter:
    """The operators of `graph` once onnxruntime's CPU session has optimized it (what the backend runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"optimized-{graph.name}")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.data")
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_the_graphs_keep_the_forms_onnxruntime_fuses(dummy_bundle: Path, tmp_path: Path) -> None:
    """The exported forms the CPU's speed rests on (`exporter.layers.gelu_tanh`, `exporter.gemma.mask_bias`,
    multi-query attention as one GEMM): every tanh GELU becomes one FastGelu kernel; the expert's mask is
    selected once, not per layer, and no heads axis is transposed."""
    vlm, expert = (optimized_op_counts(dummy_bundle / f"{name}.onnx", tmp_path) for name in ("vlm", "expert"))
    for ops in (vlm, expert):
        assert ops["FastGelu"] > 0 and ops["Tanh"] == 0, ops
    assert expert["Where"] == 1 and expert["Transpose"] == 0, expert


def test_fp32_bundle_manifest(fixture_bundle) -> None:
    golden, precision, out = fixture_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["exporter"]["opset"] == 15
    assert manifest["precision"] == precision and manifest["source"] == "lerobot"
    assert manifest["policy"]["camera_keys"][0] == "observation.images.top"
    assert manifest["policy"]["state_norm"]["eps"] == 1e-8
    vlm = manifest["graphs"]["vlm"]
    names = [i["name"] for i in vlm["inputs"]]
    assert names == ["images", "image_masks", "tokens", "token_mask"]
    # aloha-sim: 1 camera + 2 always-empty slots, which the graphs leave out
    slots = 1 if golden.name.endswith("aloha-sim") else 2
    assert manifest["empty_cameras_dropped"] == (2 if golden.name.endswith("aloha-sim") else 0)
    assert manifest["policy"]["empty_cameras"] == 0
    assert vlm["inputs"][0]["shape"] == [1, slots, 3, 224, 224] and vlm["inputs"][0]["dtype"] == "float32"
    kv_dtype = "float16" if precision == "fp16" else "float32"
    assert vlm["outputs"][0] == {"name": "prefix_keys", "shape": [4, 1, slots * 256 + 12, 16], "dtype": kv_dtype}
    assert manifest["graphs"]["expert"]["outputs"] == [{"name": "velocity", "shape": [1, 16, 32], "dtype": "float32"}]
    assert set(manifest["files"]) == {"vlm.onnx", "expert.onnx", "report.json", "atc.sh"}
    # no npu-smi here and no --soc-version: atc.sh reads the SoC where it runs (or takes it as its argument)
    assert manifest["compiled"] == {"om": {"device": "", "files": {}, "script": "atc.sh"}}
    assert "atc" not in manifest and all("om" not in graph for graph in manifest["graphs"].values())


def test_fp16_survives_activations_beyond_fp16_range(tmp_path: Path) -> None:
    """Scale the token embeddings so the residual stream exceeds 65 504 (fp16's largest value): plain
    fp16 cannot hold it; our fp16 export keeps the residual in fp32 and stays close to fp32."""
    policy = build_preset("pi0-dummy", seed=1)
    with torch.no_grad():
        policy.model.embed_tokens.weight *= 3000
    peak = []
    hook = policy.model.llm.layers[1].register_forward_pre_hook(lambda m, args: peak.append(args[0].abs().max()))
    build_bundle(policy, tmp_path / "bundle", BundleOptions(precision="fp16"), **QUIET)
    hook.remove()
    assert float(peak[0]) > float(np.finfo(np.float16).max)  # plain fp16 would hold inf here
    report = json.loads((tmp_path / "bundle" / "report.json").read_text())
    e2e = report["results"]["end_to_end"]
    print(f"\nresidual peak {float(peak[0]):.0f}; fp16 bundle vs fp32: {e2e}; scaled {report['calibration']['scaled']}")
    assert report["passed"] and np.isfinite(e2e["max_abs"]) and e2e["cosine"] >= 0.999
    assert all(float32_cube_ops(tmp_path / "bundle" / f"{g}.onnx") == [] for g in ("vlm", "expert"))


def _hot_matmuls(seed: int = 1):
    """pi0-dummy with a projector and a Gemma MLP whose *outputs* pass 65 504 (not only the residual sum):
    bf16 and float32 hold them, a float16 matmul returns inf."""
    policy = build_preset("pi0-dummy", seed=seed)
    with torch.no_grad():
        policy.model.projector.weight *= 3e4
        policy.model.llm.layers[0].mlp.gate_proj.weight *= 3e4  # its output passes 65 504
        policy.model.llm.layers[0].mlp.up_proj.weight *= 30  # in range; the product is not
    return policy


def test_fp16_scales_the_matmuls_whose_outputs_pass_fp16_range(tmp_path: Path) -> None:
    """Calibration finds them and gives each the smallest power-of-two scale k that brings its input and
    output to 2^13 (the product gelu(gate) * up, down_proj's input, included); every matmul stays float16
    (none for the AI CPU), and the fp16 bundle passes the criteria set by the model's own bf16 run.
    Without the scales it cannot."""
    build_bundle(_hot_matmuls(), tmp_path / "bundle", BundleOptions(precision="fp16", atc_mode="never"), **QUIET)
    report = json.loads((tmp_path / "bundle" / "report.json").read_text())
    calibration = report["calibration"]
    ops, scaled = calibration["ops"], calibration["scaled"]
    print(f"\nhot: scaled {scaled}, share {calibration['scaled_flops_share']:.4f}, {report['results']}")
    mlp = "llm.layers.0.mlp"
    assert ops["projector"]["max_out"] > 65504 and ops[f"{mlp}.gate_proj"]["max_out"] > 65504
    assert ops[f"{mlp}.up_proj"]["max_out"] < 8192 < 65504 < ops[f"{mlp}.down_proj"]["max_in"]  # the product
    assert {"projector", f"{mlp}.gate_proj", f"{mlp}.down_proj"} <= set(scaled) and f"{mlp}.up_proj" not in scaled
    assert "llm.layers.1.mlp.down_proj" not in scaled and 0 < calibration["scaled_flops_share"] < 0.5
    for name, k in scaled.items():  # the smallest k with headroom
        r = ops[name]
        if isinstance(k, list):  # an attention product: (a 2^-k_a) @ (b 2^-k_b)
            assert r["max_in"] * 2.0 ** -k[0] <= 8192 and r["max_in_b"] * 2.0 ** -k[1] <= 8192
            assert r["max_out"] * 2.0 ** -sum(k) <= 8192
        else:
            assert max(r["max_in"], r["max_out"]) * 2.0**-k <= 8192 < max(r["max_in"], r["max_out"]) * 2.0 ** -(k - 1)
    assert calibration["float32_cube_ops"] == {}
    assert all(float32_cube_ops(tmp_path / "bundle" / f"{g}.onnx") == [] for g in ("vlm", "expert"))
    assert not list((tmp_path / "bundle").glob("*.keep_dtype.cfg"))
    e2e, bf16 = report["results"]["end_to_end"], report["yardsticks"]["bf16"]["end_to_end"]
    assert report["passed"] and np.isfinite(e2e["max_abs"]) and e2e["cosine"] >= 0.999
    assert e2e["max_abs"] <= bf16["max_abs"] and e2e["mean_abs"] <= bf16["mean_abs"]

    plain = BundleOptions(precision="fp16", atc_mode="never", fp16_scaling=False)  # every matmul plain fp16
    with pytest.raises(BundleBuildError, match="validation failed"):
        build_bundle(_hot_matmuls(), tmp_path / "plain", plain, **QUIET)
    failed = json.loads((tmp_path / "plain.failed" / "report.json").read_text())
    assert not np.isfinite(failed["results"]["end_to_end"]["max_abs"])


def test_scales_are_the_smallest_powers_of_two_with_headroom() -> None:
    from exporter.precision import OpRange, PrecisionError, scales

    ranges = {
        "in_range": OpRange("Linear", 1.0, 8192.0, 1.0),
        "just_over": OpRange("Linear", 1.0, 8193.0, 1.0),
        "hot_input": OpRange("Conv2d", 70000.0, 3.0, 1.0),  # 70000 / 2^4 = 4375 <= 8192 < 8750
        "gather": OpRange("Embedding", 0.0, 20000.0, 20000.0),  # no arithmetic: never scaled
        "scores": OpRange("MatMul", 9000.0, 2e5, 0.0, max_in_b=100.0),  # a: 2^-1, then the output: 2^-4 more
    }
    assert scales(ranges) == {"hot_input": 4, "just_over": 1, "scores": [5, 0]}
    with pytest.raises(PrecisionError, match="weights beyond fp16's range"):
        scales({"w": OpRange("Linear", 1.0, 1.0, 70000.0)})


def test_a_float32_matmul_in_an_fp16_bundle_is_refused_unless_allowed(tmp_path: Path, monkeypatch) -> None:
    """A matmul left float32 (here action_out_proj, by hand) would run on the 310P's AI CPU: the export
    names it and the flag; with --allow-ai-cpu it builds, and report.json lists the op."""
    import exporter.bundle
    from exporter.precision import to_precision_

    def leave_one_float32(model, precision, scaled=None):
        to_precision_(model, precision, scaled)
        model.action_out_proj.float()
        return model

    monkeypatch.setattr(exporter.bundle, "to_precision_", leave_one_float32)
    options = BundleOptions(precision="fp16", atc_mode="never", validate=False)
    with pytest.raises(BundleBuildError, match=r"AI CPU.*expert\.onnx: .*action_out_proj.*--allow-ai-cpu"):
        build_bundle(build_preset("pi0-dummy"), tmp_path / "refused", options, **QUIET)
    allowed = replace(options, allow_ai_cpu=True)
    build_bundle(build_preset("pi0-dummy"), tmp_path / "allowed", allowed, **QUIET)
    found = json.loads((tmp_path / "allowed" / "report.json").read_text())["calibration"]["float32_cube_ops"]
    assert list(found) == ["expert"] and any("action_out_proj" in op for op in found["expert"])


def test_calibration_on_the_users_frames_finds_what_the_validation_inputs_miss(tmp_path: Path) -> None:
    """A patch embedding that is hot only for saturated red frames (random and constant images cancel
    out): the validation's inputs never reach 65 504, a red frame passed with --calibration does, and
    only the bundle calibrated on it serves that frame with finite actions."""
    from exporter.torch_backend import reference_engine
    from runtime.engine import Engine, EngineError
    from runtime.pipeline.observation import Observation

    def hot_for_red():
        policy = build_preset("pi0-dummy", seed=1)
        with torch.no_grad():
            w = policy.model.vision.patch_embedding.weight
            w.zero_()
            w[:, 0], w[:, 1] = 200.0, -200.0  # red (R = +1, G = -1) adds up to 2 x 196 x 200 = 78 400
        return policy

    reference = reference_engine(hot_for_red())
    synthetic = Observation.synthetic(reference.metadata(), seed=3)
    images = {k: np.broadcast_to(np.array([255, 0, 0], np.uint8), v.shape).copy() for k, v in synthetic.images.items()}
    red = replace(synthetic, images=images, noise=np.random.default_rng(0).standard_normal((1, 50, 32), np.float32))
    red.save_npz(tmp_path / "red.npz")
    want = reference.infer(red)[0]

    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    build_bundle(hot_for_red(), plain, BundleOptions(precision="fp16"), **QUIET)
    build_bundle(
        hot_for_red(), calibrated, BundleOptions(precision="fp16", calibration=(tmp_path / "red.npz",)), **QUIET
    )
    plain_cal = json.loads((plain / "report.json").read_text())["calibration"]
    cal = json.loads((calibrated / "report.json").read_text())["calibration"]
    assert plain_cal["inputs"] == 1 and plain_cal["ops"]["vision.patch_embedding"]["max_out"] < 8192
    assert cal["inputs"] == 2 and cal["ops"]["vision.patch_embedding"]["max_out"] > 65504
    assert cal["scaled"]["vision.patch_embedding"] >= 4 and "vision.patch_embedding" not in plain_cal["scaled"]

    def served(bundle_dir: Path) -> np.ndarray:
        bundle = load_bundle(bundle_dir)
        return Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)).infer(red)[0]

    with pytest.raises(EngineError, match="non-finite actions"):  # fp16 inf from the conv: refused, never sent
        served(plain)
    m = compare(served(calibrated), want)
    assert m["cosine"] >= 0.999, m


def test_a_calibration_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleBuildError, match=r"calibration observation .*bad\.npz"):
        build_bundle(
            build_preset("pi0-dummy"), tmp_path / "b", BundleOptions(calibration=(tmp_path / "bad.npz",)), **QUIET
        )


def test_failed_validation_exits_nonzero_and_keeps_the_evidence(tmp_path: Path, monkeypatch) -> None:
    import exporter.validate as validate

    monkeypatch.setattr(validate, "FP32_MAX_ABS", 0.0)
    monkeypatch.setattr(validate, "FLOOR_MULTIPLE", 0.0)
    with pytest.raises(BundleBuildError, match="validation failed"):
        build_bundle(build_preset("pi0-dummy"), tmp_path / "b", BundleOptions(), **QUIET)
    assert not (tmp_path / "b").exists()
    assert json.loads((tmp_path / "b.failed" / "report.json").read_text())["passed"] is False


def _graph(op: str, dtype: int = TensorProto.FLOAT, dims=(1, 4), opset: int = 15) -> onnx.ModelProto:
    node = (
        helper.make_node(op, ["x", "x"], ["y"], equation="ij,ij->ij")
        if op == "Einsum"
        else helper.make_node(op, ["x", "x"], ["y"])
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", dtype, list(dims))],
        [helper.make_tensor_value_info("y", dtype, list(dims))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_lint() -> None:
    assert lint(_graph("Add")) == []
    assert any("Einsum" in p for p in lint(_graph("Einsum", opset=15)))
    assert any("not in the checked list" in p for p in lint(_graph("Mod")))
    assert any("bfloat16" in p for p in lint(_graph("Add", dtype=TensorProto.BFLOAT16)))
    assert any("complex64" in p for p in lint(_graph("Add", dtype=TensorProto.COMPLEX64)))
    assert any("dynamic shape" in p for p in lint(_graph("Add", dims=("batch", 4))))
    assert any("opset 19" in p for p in lint(_graph("Add", opset=19)))
    assert any("registered by ATC for opsets 8-15, not 18" in p for p in lint(_graph("Add", opset=18)))


def test_float32_cube_ops() -> None:
    assert float32_cube_ops(_graph("MatMul")) == ["MatMul#0"]  # unnamed nodes by type and index
    assert float32_cube_ops(_graph("MatMul", dtype=TensorProto.FLOAT16)) == []
    assert float32_cube_ops(_graph("Add")) == []


def test_atc_compiles_with_the_device_soc(tmp_path: Path, ascend_tools: Path, monkeypatch) -> None:
    monkeypatch.setenv("STANDIN_NPU_CHIP", "310P3")
    out = tmp_path / "bundle"
    options = BundleOptions(precision="fp16", atc_mode="auto", validate=False)
    build_bundle(build_preset("pi0-dummy"), out, options, **QUIET)
    bundle = load_bundle(out)
    manifest = bundle.manifest
    files = {"vlm": "om/vlm.om", "expert": "om/expert.om"}
    assert manifest.compiled == {OM: CompiledTarget(device="Ascend310P3", files=files, script=None)}
    for name in ("vlm", "expert"):
        om = bundle.artefact(OM)[name]
        assert om == out / "om" / f"{name}.om" and om.read_text().startswith("ATC-STANDIN soc=Ascend310P3")
        assert f"om/{name}.om" in manifest.files and f"om/{name}.atc.log" in manifest.files
        assert "ATC run success" in (out / "om" / f"{name}.atc.log").read_text()


def test_atc_failure_is_reported_with_its_log(tmp_path: Path, ascend_tools: Path, monkeypatch) -> None:
    monkeypatch.setenv("STANDIN_NPU_CHIP", "310P3")
    with pytest.raises(AtcError, match=r"atc failed on vlm .*vlm\.atc\.log"):
        build_bundle(
            build_preset("pi0-dummy"),
            tmp_path / "b",
            BundleOptions(precision="fp16", soc_version="Ascend310P1", validate=False),
            **QUIET,
        )


def test_without_atc_the_script_has_the_exact_commands(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert shutil.which("atc") is None
    with pytest.raises(AtcError, match="atc is not on PATH"):
        build_bundle(
            build_preset("pi0-dummy"), tmp_path / "a", BundleOptions(atc_mode="always", validate=False), **QUIET
        )
    out = tmp_path / "b"
    build_bundle(build_preset("pi0-dummy"), out, BundleOptions(soc_version="Ascend310P3", validate=False), **QUIET)
    script = (out / "atc.sh").read_text()
    assert 'SOC="${1:-Ascend310P3}"' in script  # the SoC given at export, unless the script is given one
    assert 'atc --model=vlm.onnx --framework=5 --output=om/vlm --soc_version="$SOC"' in script
    assert "--precision_mode_v2=origin" in script and "expert.onnx" in script
    assert "ALLOW_AI_CPU" in script  # an fp32 bundle: atc.sh refuses unless told, every matmul on the AI CPU


def test_the_script_runs_under_atc(tmp_path: Path, ascend_tools: Path) -> None:
    out = tmp_path / "bundle"
    build_bundle(build_preset("pi0-dummy"), out, BundleOptions(atc_mode="never", validate=False), **QUIET)
    refused = subprocess.run(["bash", str(out / "atc.sh")], capture_output=True, text=True)
    assert refused.returncode == 2 and "AI CPU" in refused.stderr and not (out / "om").exists()
    allowed = {**os.environ, "ALLOW_AI_CPU": "1"}
    subprocess.run(["bash", str(out / "atc.sh")], check=True, capture_output=True, env=allowed)
    assert (out / "om" / "vlm.om").is_file() and (out / "om" / "expert.om").is_file()


def test_prompts_and_tokenizer_in_the_bundle(tmp_path: Path, tokenizer_path: Path) -> None:
    out = tmp_path / "bundle"
    options = BundleOptions(tokenizer=tokenizer_path, prompts=("transfer the cube", "insert the peg"), validate=False)
    build_bundle(build_preset("pi0-dummy"), out, options, **QUIET)
    bundle = load_bundle(out)
    fixed = bundle.manifest.prompt.fixed
    assert [f.text for f in fixed] == ["transfer the cube", "insert the peg"]
    assert fixed[0].tokens[0] == 2 and len(fixed[0].tokens) == 48 and fixed[0].mask.count(True) > 2
    assert bundle.tokenizer.read_bytes() == tokenizer_path.read_bytes()


def test_an_existing_bundle_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(BundleBuildError, match="not an empty directory"):
        build_bundle(build_preset("pi0-dummy"), tmp_path / "b", BundleOptions(), **QUIET)
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"


def test_altered_file_is_refused_by_name(dummy_bundle: Path, tmp_path: Path) -> None:
    copy = altered_copy(dummy_bundle, tmp_path / "copy", "expert.onnx", at=1 / 2, mask=1)
    with pytest.raises(BundleError, match=r"expert\.onnx does not match its sha256"):
        load_bundle(copy)
    (copy / "expert.onnx").unlink()
    with pytest.raises(BundleError, match=r"expert\.onnx is missing"):
        load_bundle(copy)


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "link.onnx"])
def test_manifest_names_cannot_leave_the_bundle(dummy_bundle: Path, tmp_path: Path, name: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dummy_bundle, copy)
    (copy / "link.onnx").symlink_to(copy / "vlm.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"not a plain path inside the bundle|symlink"):
        load_bundle(copy)


def test_schema_version_is_checked(dummy_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dummy_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99"):
        load_bundle(copy)


def test_bundle_loads_without_torch(dummy_bundle: Path) -> None:
    """The robot side reads a bundle with numpy and json only."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
        "from runtime.bundle.manifest import load_bundle\n"
        f"b = load_bundle({str(dummy_bundle)!r}); print(b.spec.chunk_size, sorted(b.graphs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "50 ['expert', 'vlm']"


def test_cli_bundle_help_and_run(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("pi0-export")
    help_text = subprocess.run([exe, "bundle", "--help"], capture_output=True, text=True, check=True).stdout
    for option in (
        "--checkpoint",
        "--preset",
        "--out",
        "--precision",
        "--num-steps",
        "--tokenizer",
        "--prompt",
        "--soc-version",
        "--atc",
        "--no-validate",
        "--allow-ai-cpu",
    ):
        assert option in help_text
    out = subprocess.run(
        [
            exe,
            "bundle",
            "--preset",
            "pi0-dummy",
            "--out",
            str(tmp_path / "b"),
            "--num-steps",
            "4",
            "--prompt",
            "pick up the cube",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "end_to_end", "passed"):
        assert step in out.stderr
    bundle = load_bundle(tmp_path / "b")
    assert bundle.spec.num_steps == 4 and bundle.manifest.prompt.tokenizer == "tokenizer.model"


def test_external_weights_are_gathered_into_one_file(tmp_path: Path) -> None:
    """Over 2 GB, torch writes one file per tensor; the exporter streams them into `<graph>.data`."""
    from exporter.onnx_export import _gather_external_data

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3)]
    nodes, value = [], "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [value, f"w{i}"], [f"h{i}"]))
        value = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, 64])],
        initializer=[onnx.numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    split = tmp_path / "split"
    split.mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8),
        str(split / "g.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(split.iterdir())) == 4
    model = onnx.load(str(split / "g.onnx"), load_external_data=False)
    out = tmp_path / "out"
    out.mkdir()
    _gather_external_data(model, split, out / "g.onnx.data")
    onnx.save(model, str(out / "g.onnx"))
    shutil.rmtree(split)
    import onnxruntime as ort

    x = rng.standard_normal((1, 64)).astype(np.float32)
    got = ort.InferenceSession(str(out / "g.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weights[0] @ weights[1] @ weights[2], rtol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["g.onnx", "g.onnx.data"]


def test_without_memory_for_the_yardsticks_the_absolute_criteria_apply(tmp_path: Path, monkeypatch) -> None:
    """The full pi0's float64 copy is 26 GB: where it does not fit, the export still validates, says why."""
    import exporter.bundle

    monkeypatch.setattr(exporter.bundle, "memory_available", lambda: 2**20)
    build_bundle(build_preset("pi0-dummy"), tmp_path / "b", BundleOptions(precision="fp16"), **QUIET)
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["passed"] and report["yardsticks"] == {} and "float64 copy" in report["yardsticks_skipped"]
    assert report["thresholds"] == {"cosine": 0.999, "mean_abs": 1e-2}
    assert all(float32_cube_ops(tmp_path / "b" / f"{g}.onnx") == [] for g in ("vlm", "expert"))  # pi0-dummy

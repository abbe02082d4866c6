"""int8 bundles for the CPU backend (exporter/int8.py): onnxruntime's dynamic quantization where it holds,
validated against the model's own bf16 run per graph and end to end, refused where it cannot hold."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import QUIET
from torch import nn

from exporter import int8
from exporter.bundle import BundleBuildError, BundleOptions, build_bundle
from exporter.onnx_export import example_inputs
from exporter.presets import build_preset
from exporter.validate import compare, end_to_end, reference, validation_request, yardsticks
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import load_bundle
from runtime.engine import Engine
from runtime.pipeline.model_io import ModelInputs
from runtime.pipeline.observation import Observation

INT8 = BundleOptions(precision="int8", atc_mode="never")


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "bundle"
    build_bundle(build_preset("pi0-dummy", seed=0), out, INT8, **QUIET)
    return out


def report_of(bundle: Path) -> dict:
    return json.loads((bundle / "report.json").read_text())


def ops_in(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_an_int8_bundle_validates_with_int8_matmuls(int8_bundle: Path) -> None:
    """Validated per graph and end to end against bf16's own error; its graphs hold onnxruntime's int8 ops,
    one MatMulInteger per matmul the report calls int8; no OM target, no atc.sh."""
    report = report_of(int8_bundle)
    assert report["passed"] and report["precision"] == "int8"
    for graph in ("vlm", "expert"):
        limits, result = report["graph_thresholds"][graph], report["results"][graph]
        bf16 = report["yardsticks"]["bf16"][graph]
        assert limits == {"cosine": 0.999, "max_abs": bf16["max_abs"], "mean_abs": bf16["mean_abs"]}
        assert result["cosine"] >= 0.999 and result["max_abs"] <= bf16["max_abs"]
        assert result["mean_abs"] <= bf16["mean_abs"]
    section = report["int8"]
    for graph in ("vlm", "expert"):
        ops = ops_in(int8_bundle / f"{graph}.onnx")
        assert ops["MatMulInteger"] == len(section["int8"][graph]) == section["ops"][graph]["MatMulInteger"]
        assert 0 < ops["DynamicQuantizeLinear"] <= ops["MatMulInteger"]
    assert len(section["int8"]["vlm"]) >= 10 and 0 < section["int8_flops_share"] < 1
    manifest = load_bundle(int8_bundle).manifest
    assert manifest.precision == "int8" and manifest.compiled == {}
    assert not (int8_bundle / "atc.sh").exists()


def test_the_report_says_what_stayed_fp32_and_why(int8_bundle: Path) -> None:
    """Every matmul of the model is int8 or listed fp32 with its reason: the attention products, the first and
    last projections (patch embedding, projector, the prefix cache's k/v, the suffix), the rest by the search."""
    section = report_of(int8_bundle)["int8"]
    fp32, chosen = section["fp32"], {m for modules in section["int8"].values() for m in modules}
    model = build_preset("pi0-dummy", seed=0).model
    matmuls = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) or n.endswith((".qk", ".pv"))
    }
    absent = set(section["not_in_graphs"])  # the last layer's q/o/MLP: only its keys and values are read
    assert absent == {
        f"llm.layers.3.{m}"
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert matmuls == chosen | set(fp32) | absent and not chosen & set(fp32)
    why = {name: entry["why"] for name, entry in fp32.items()}
    assert why["llm.layers.0.self_attn.qk"].startswith("attention product")
    assert why["vision.patch_embedding"].startswith("first projection")
    assert why["projector"].startswith("first projection of the language model")
    assert why["llm.layers.3.self_attn.k_proj"].startswith("last projection of the VLM graph")
    assert why["action_out_proj"].startswith("suffix projection") and "state_proj" in why
    assert fp32["projector"]["max_in"] > 0  # the calibrated figures beside the reason
    searched = [name for name, w in why.items() if w.startswith("left fp32 by the search")]
    assert all(fp32[name]["predicted_noise"] > 0 for name in searched)
    assert {t["graph"] for t in section["search"]} == {"vlm", "expert"}


def test_the_served_chunk_is_the_one_recorded_in_the_report(int8_bundle: Path) -> None:
    """The runtime's Engine on onnxruntime serves the validated bundle's chunk, as report.json recorded it."""
    served = report_of(int8_bundle)["int8"]["served"]
    bundle = load_bundle(int8_bundle)
    engine = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle))
    actions = engine.infer(replace(Observation.synthetic(engine.metadata(), seed=0), guidance_scale=1.0))[0]
    assert served["observation"] == "Observation.synthetic(metadata, seed=0), guidance_scale 1"
    np.testing.assert_allclose(actions, np.array(served["actions"], np.float32), rtol=0, atol=1e-6)


def test_held_out_requests_are_measured_against_their_own_bf16_run(int8_bundle: Path) -> None:
    """The int8 set is chosen on the validation request (seed 0); report.json measures HELD_OUT more
    (seeds 1-3), each beside its own bf16 run, and their means, without judging them. The first one is
    recomputed here from the model and the bundle."""
    held = report_of(int8_bundle)["int8"]["held_out"]
    assert [r["seed"] for r in held["requests"]] == [1, 2, 3]
    policy, bundle = build_preset("pi0-dummy", seed=0), load_bundle(int8_bundle)
    inputs, noise = validation_request(policy.spec, bundle.spec, policy.model, 1)
    ref = reference(policy.model, inputs, noise, policy.spec.num_steps)
    first = held["requests"][0]
    bf16 = yardsticks(policy.model, ref)["bf16"]
    for figure in int8.FIGURES:
        assert first["bf16"][figure] == pytest.approx(bf16[figure], rel=1e-5)
    backend = OnnxRuntimeBackend(bundle)
    chunk = compare(end_to_end(backend, ref, bundle.spec), ref.actions)
    assert first["int8"]["end_to_end"] == pytest.approx(chunk, rel=1e-5)
    assert first["int8"]["end_to_end"] != first["bf16"]["end_to_end"]  # the bundle's own figures, not bf16's
    mean = np.mean([r["int8"]["expert"]["max_abs"] for r in held["requests"]])
    assert held["mean"]["int8"]["expert"]["max_abs"] == pytest.approx(mean)
    assert set(held["within_bf16_on_average"]) == set(int8.FIGURES)


def _calibrated_plan(policy) -> int8.Plan:
    model, spec = policy.model, policy.spec
    x = example_inputs(spec, model, 0)
    inputs = ModelInputs(x["images"], x["image_masks"], x["tokens"], x["token_mask"], x["state"])
    with int8.Int8Recorder(model) as recorder:
        reference(model, inputs, x["noise"], spec.num_steps)
    return int8.plan(model, recorder)


def test_calibration_keeps_outliers_fp32() -> None:
    """A massive activation (one channel of an MLP product 1000x the others) and a weight outlier (one element
    of a channel): both matmuls stay fp32, named with their calibrated ranges; their neighbours stay candidates."""
    policy = build_preset("pi0-dummy", seed=0)
    with torch.no_grad():
        mlp = policy.model.llm.layers[1].mlp
        mlp.up_proj.weight[5] *= 1000  # down_proj's input: gelu(gate) * up, channel 5 massive
        policy.model.vision.layers[0].mlp.fc2.weight[3, 7] = 50.0  # 128 inputs: 2.6% noise in its channel
    the_plan = _calibrated_plan(policy)
    down, fc2 = the_plan.fp32["llm.layers.1.mlp.down_proj"], the_plan.fp32["vision.layers.0.mlp.fc2"]
    assert "calibrated input range" in down["why"] and "(outliers)" in down["why"] and down["input_noise"] > 0.02
    assert "weights up to 50" in fc2["why"] and fc2["weight_noise"] > 0.02
    assert {"llm.layers.1.mlp.up_proj", "llm.layers.1.mlp.gate_proj", "vision.layers.0.mlp.fc1"} <= set(
        the_plan.candidates
    )
    noise = [the_plan.noise[name] for name in the_plan.candidates]
    assert noise == sorted(noise)


def test_quantizing_everything_is_refused_with_its_reason(tmp_path: Path, monkeypatch) -> None:
    """Negative control: no rule, no calibrated exclusion, no search (every weight matmul int8, the outlier-heavy
    suffix and cache writers included): the bundle misses bf16's error and is refused, kept for inspection."""
    monkeypatch.setattr(int8, "_rule", lambda name, kind: "attention product" if kind != "Linear" else None)
    monkeypatch.setattr(int8, "NOISE_LIMIT", float("inf"))
    monkeypatch.setattr(int8, "_longest", lambda n, holds: n)
    with pytest.raises(BundleBuildError, match=r"validation failed \(.*(vlm|expert|end_to_end) max_abs .* > "):
        build_bundle(build_preset("pi0-dummy", seed=0), tmp_path / "b", INT8, **QUIET)
    report = report_of(tmp_path / "b.failed")
    assert not report["passed"] and report["int8"]["ops"]["expert"]["MatMulInteger"] > 20
    assert not (tmp_path / "b").exists()


def test_a_model_where_no_matmul_holds_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A tightened bar (cosine 1: nothing rounded can meet it): the search finds no matmul that holds in int8,
    and the export is refused with what the smallest tries measured."""
    import exporter.validate

    monkeypatch.setattr(exporter.validate, "FP16_COSINE", 1.0)
    with pytest.raises(int8.Int8Error, match=r"no matmul of this model holds in int8 .*vlm with 1 int8: max abs"):
        build_bundle(build_preset("pi0-dummy", seed=0), tmp_path / "b", INT8, **QUIET)


def test_int8_is_for_onnxruntime_only(int8_bundle: Path, tmp_path: Path) -> None:
    """Refused for atc (before anything is exported), by the ACL backend, and without validation."""
    from runtime.backends.acl import AclBackend, AclError

    with pytest.raises(int8.Int8Error, match=r"CPU \(onnxruntime\) backend only.*--atc never"):
        build_bundle(build_preset("pi0-dummy"), tmp_path / "a", BundleOptions(precision="int8", atc_mode="always"))
    with pytest.raises(AclError, match=r"int8, for the CPU \(onnxruntime\) backend only"):
        AclBackend(load_bundle(int8_bundle))
    with pytest.raises(int8.Int8Error, match="--no-validate"):
        build_bundle(build_preset("pi0-dummy"), tmp_path / "n", BundleOptions(precision="int8", validate=False))
    assert not (tmp_path / "a.partial").exists() and not (tmp_path / "n.partial").exists()


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 fma avx512f avx512bw\n"
WITH_VNNI = "processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 fma avx512f avx512bw avx512_vnni\n"


def test_an_int8_bundle_is_refused_on_a_cpu_whose_int8_gemms_saturate(
    int8_bundle: Path, dummy_bundle: Path, monkeypatch
) -> None:
    """The bundle was validated where int8 products add in 32 bits (this machine's VNNI); on an x86 CPU without
    VNNI or AMX onnxruntime's u8s8 GEMMs pair them in 16 bits and saturate, so the actions would not be the
    validated ones: refused there, with the reason; fp32 bundles are served there as anywhere."""
    import runtime.backends.onnxruntime as ort_backend
    from runtime.bundle.manifest import BundleError

    assert ort_backend.x86_without_int8_dot(AVX2_ONLY)
    assert not ort_backend.x86_without_int8_dot(WITH_VNNI)
    assert not ort_backend.x86_without_int8_dot("processor\t: 0\n")  # no flags to read: not known to lack them

    monkeypatch.setattr(ort_backend, "x86_without_int8_dot", lambda: True)
    with pytest.raises(BundleError, match=r"int8 GEMMs can saturate.*serve the policy's fp32 bundle"):
        OnnxRuntimeBackend(load_bundle(int8_bundle))
    OnnxRuntimeBackend(load_bundle(dummy_bundle)).close()  # fp32: nothing to refuse
    monkeypatch.setattr(ort_backend, "x86_without_int8_dot", lambda: False)
    OnnxRuntimeBackend(load_bundle(int8_bundle)).close()


def test_the_help_explains_int8(capsys) -> None:
    from exporter.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bundle", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "int8 for CPUs only" in text and "ACL backend" in text and "attention products" in text
    assert "calibrated input or weight ranges" in text and "int8 ranges" in text


def test_requantizing_a_graph_with_external_data_replaces_its_weights(tmp_path: Path) -> None:
    """Graphs over 2 GB keep their weights in `<graph>.data`, and the search quantizes the same graph many
    times into the same place: each time the data file holds one copy of the weights, not one per try (onnx
    appends to a data file that is there), and the graph runs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    source = tmp_path / "source" / "g.onnx"
    source.parent.mkdir()
    onnx.save(model, str(source), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    out = tmp_path / "bundle" / "g.onnx"
    out.parent.mkdir()
    files = [source, source.with_name("g.onnx.data")]
    sizes = []
    for _ in range(3):
        int8.quantize_graph(files, out, ["mm"])
        sizes.append(out.with_name("g.onnx.data").stat().st_size)
    assert sizes[0] == sizes[1] == sizes[2] > 0
    x = rng.standard_normal((4, 256)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert np.abs(got - x @ numpy_helper.to_array(weight)).max() < 0.1 * np.abs(got).max()
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["MatMulInteger"] == 1

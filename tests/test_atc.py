"""The atc step against the stand-ins for CANN's `atc` and `npu-smi` (tests/stubs/), which enforce what
CANN's documentation says (docs/cann-facts.md): precision options, AI CPU placement under origin,
`atc --mode=1` JSON, --external_weight; no silent SoC (exporter, atc.sh, `pi0-runtime check` / serve /
install-bundle); the minimum CANN version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import QUIET, ascend_tools_path
from onnx import TensorProto, helper, numpy_helper

from exporter import atc
from exporter.bundle import BundleBuildError, BundleOptions, _record_placement, atc_plan, build_bundle
from exporter.presets import build_preset
from runtime.bundle.manifest import OM, load_bundle
from runtime.npu import (
    MIN_CANN,
    SocMismatchError,
    cann_version,
    check_om_soc,
    device_soc,
    om_soc_check,
    parse_cann_version,
)

STANDIN = Path(__file__).parent / "stubs" / "atc.py"


def _graph(path: Path, dtype: int = TensorProto.FLOAT, external: bool = False) -> Path:
    """x @ w + b, then Relu: one matrix op and two vector ops, in `dtype`."""
    w = numpy_helper.from_array(np.full((4, 4), 0.5, helper.tensor_dtype_to_np_dtype(dtype)), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul"),
        helper.make_node("Relu", ["y"], ["z"], name="/act/Relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, [1, 4])],
        [helper.make_tensor_value_info("z", dtype, [1, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _atc(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["atc", *argv], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def only_atc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """atc on PATH and no npu-smi: a workstation with CANN's toolkit and no card."""
    bin_dir = tmp_path / "atc-bin"
    path = ascend_tools_path(bin_dir)
    (bin_dir / "npu-smi").unlink()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    assert shutil.which("npu-smi") is None and path
    return bin_dir


# --- the stand-in, per the docs ----------------------------------------------------------------------


def test_standin_precision_options_are_the_documented_ones(tmp_path: Path, ascend_tools: Path) -> None:
    _graph(tmp_path / "g.onnx")
    base = ["--model=g.onnx", "--framework=5", "--output=g", "--soc_version=Ascend310P3"]
    for ok in ("--precision_mode_v2=fp16", "--precision_mode_v2=origin", "--precision_mode_v2=cube_fp16in_fp32out",
               "--precision_mode_v2=mixed_float16", "--precision_mode=force_fp16", "--precision_mode=must_keep_origin_dtype",
               "--precision_mode=allow_fp32_to_fp16", "--precision_mode=force_fp32"):  # fmt: skip
        assert _atc(*base, ok, cwd=tmp_path).returncode == 0, ok
    for bad, why in (
        ("--precision_mode_v2=mixed_bfloat16", "not supported on Ascend310P3"),
        ("--precision_mode_v2=mixed_hif8", "not supported on Ascend310P3"),
        ("--precision_mode_v2=cube_hif8", "not supported on Ascend310P3"),
        ("--precision_mode_v2=force_fp16", "unsupported --precision_mode_v2"),  # a v1 value
        ("--precision_mode=origin", "unsupported --precision_mode"),  # a v2 value
    ):
        result = _atc(*base, bad, cwd=tmp_path)
        assert result.returncode == 1 and why in result.stderr, (bad, result.stderr)
    both = _atc(*base, "--precision_mode_v2=origin", "--precision_mode=force_fp16", cwd=tmp_path)
    assert both.returncode == 1 and "cannot be used together" in both.stderr


def test_standin_places_fp32_matmuls_on_the_ai_cpu_under_origin(tmp_path: Path, ascend_tools: Path) -> None:
    _graph(tmp_path / "f32.onnx")
    _graph(tmp_path / "f16.onnx", TensorProto.FLOAT16)
    engines = {}
    for model, precision in (("f32", "origin"), ("f16", "origin"), ("f32", "fp16")):
        cmd = [f"--model={model}.onnx", "--framework=5", f"--output={model}-{precision}", "--soc_version=Ascend310P3"]
        assert _atc(*cmd, f"--precision_mode_v2={precision}", cwd=tmp_path).returncode == 0
        json_file = tmp_path / f"{model}-{precision}.json"
        result = _atc("--mode=1", f"--om={model}-{precision}.om", f"--json={json_file.name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        dump = json.loads(json_file.read_text())
        assert {"key": "soc_version", "value": {"s": "Ascend310P3"}} in dump["attr"]
        ops = {op["name"]: op for op in dump["graph"][0]["op"]}
        engines[model, precision] = {
            name: next(a["value"]["s"] for a in op["attr"] if a["key"] == atc.ENGINE_ATTR) for name, op in ops.items()
        }
    assert engines["f32", "origin"]["/proj/MatMul"] == "aicpu_ascend_kernel"
    assert engines["f32", "origin"]["/act/Relu"] == "AIcoreEngine"
    assert engines["f16", "origin"]["/proj/MatMul"] == "AIcoreEngine"
    assert engines["f32", "fp16"]["/proj/MatMul"] == "AIcoreEngine"  # the default mode casts it to fp16
    first = (tmp_path / "f32-origin.om").read_text().splitlines()[0]
    assert first.startswith("ATC-STANDIN soc=Ascend310P3 model=f32.onnx sha256=")  # the pyACL stand-in reads this


def test_standin_external_weight_and_external_data(tmp_path: Path, ascend_tools: Path) -> None:
    (tmp_path / "om").mkdir()
    _graph(tmp_path / "big.onnx", external=True)
    cmd = atc.atc_command("big.onnx", "om/big", "Ascend310P3", external_weight=True)
    assert "--external_weight=1" in cmd
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True).returncode == 0
    assert [p.name.startswith("weight_") for p in (tmp_path / "om" / "weight").iterdir()] == [True]
    (tmp_path / "big.onnx.data").unlink()  # ONNX's rule: the data file sits beside the model
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and "big.onnx.data not found" in result.stderr


# --- the exporter reads what atc reports -----------------------------------------------------------------


def test_compile_graphs_reads_ai_cpu_ops_back(tmp_path: Path, ascend_tools: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    _graph(work / "vlm.onnx")
    _graph(work / "expert.onnx", TensorProto.FLOAT16)
    commands = {name: atc.atc_command(f"{name}.onnx", f"om/{name}", "Ascend310P3") for name in ("vlm", "expert")}
    compiled = atc.compile_graphs(work, commands, log=lambda m: None)
    assert compiled["vlm"].soc_version == "Ascend310P3" and compiled["vlm"].json == work / "om" / "vlm.json"
    assert compiled["vlm"].ai_cpu_matrix_ops == [
        {"name": "/proj/MatMul", "type": "MatMul", "engine": "aicpu_ascend_kernel"}
    ]
    assert compiled["expert"].ai_cpu_ops == []
    # fp16 bundle with AI CPU matmuls: refused (kept as .failed) unless allowed
    (work / "report.json").write_text("{}")
    manifest = SimpleNamespace(files={}, write=lambda d: (d / "manifest.json").write_text("{}"))
    _record_placement(work, compiled, BundleOptions(precision="fp16", allow_ai_cpu=True), out, manifest, lambda m: None)
    report = json.loads((work / "report.json").read_text())
    assert report["om"]["vlm"]["ai_cpu_ops"][0]["name"] == "/proj/MatMul" and report["om"]["expert"]["ai_cpu_ops"] == []
    with pytest.raises(BundleBuildError, match=r"matrix ops of this fp16 bundle on the AI CPU \(vlm: /proj/MatMul"):
        _record_placement(work, compiled, BundleOptions(precision="fp16"), out, manifest, lambda m: None)
    assert out.with_name(out.name + ".failed").is_dir()


def test_no_silent_soc_and_fp32_om_refused_up_front(only_atc: Path) -> None:
    with pytest.raises(BundleBuildError, match=r"give --soc-version .*\"Ascend\" \+ the Name `npu-smi info`"):
        atc_plan(BundleOptions(precision="fp16", atc_mode="auto"))
    with pytest.raises(BundleBuildError, match="every matmul on the AI CPU"):
        atc_plan(BundleOptions(atc_mode="always", soc_version="Ascend310P3"))
    with pytest.raises(BundleBuildError, match="expected Ascend"):
        atc_plan(BundleOptions(atc_mode="always", soc_version="310P3"))
    assert atc_plan(BundleOptions(atc_mode="always", soc_version="Ascend310P3", allow_ai_cpu=True)) == (
        True,
        "Ascend310P3",
    )
    assert atc_plan(BundleOptions(precision="fp16", soc_version="Ascend310P3")) == (True, "Ascend310P3")
    assert atc_plan(BundleOptions(atc_mode="never")) == (False, None)


def test_atc_sh_reads_the_soc_where_it_runs_or_refuses(tmp_path: Path, only_atc: Path) -> None:
    _graph(tmp_path / "vlm.onnx")
    commands = {"vlm": atc.atc_command("vlm.onnx", "om/vlm", "")}
    script = atc.write_script(tmp_path, commands)
    assert '--soc_version="$SOC"' in script.read_text()
    refused = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert refused.returncode == 2 and "./atc.sh Ascend310P3" in refused.stderr and not (tmp_path / "om").exists()
    given = subprocess.run(["bash", str(script), "Ascend310P3"], capture_output=True, text=True)
    assert given.returncode == 0, given.stderr
    assert (tmp_path / "om" / "vlm.om").read_text().startswith("ATC-STANDIN soc=Ascend310P3")
    ascend_tools_path(only_atc)  # npu-smi back: the script asks it (310P1 here)
    env = {**os.environ, "STANDIN_NPU_CHIP": "310P1"}
    detected = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert detected.returncode == 0 and "compiling for Ascend310P1" in detected.stdout, detected.stderr
    assert (tmp_path / "om" / "vlm.om").read_text().startswith("ATC-STANDIN soc=Ascend310P1")


def test_without_atc_nor_npu_smi_the_manifest_names_no_soc(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    out = tmp_path / "b"
    build_bundle(build_preset("pi0-dummy"), out, BundleOptions(validate=False), **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compiled"] == {"om": {"device": "", "files": {}, "script": "atc.sh"}}
    assert '--soc_version="$SOC"' in (out / "atc.sh").read_text()


# --- the runtime compares SoCs; the CANN version ------------------------------------------------------------


@pytest.fixture(scope="module")
def om_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pi0-dummy compiled by the atc stand-in for Ascend310P3 (fp32, so with --allow-ai-cpu)."""
    out = tmp_path_factory.mktemp("om") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", ascend_tools_path(tmp_path_factory.mktemp("bin")))
        mp.setenv("STANDIN_NPU_CHIP", "310P3")
        options = BundleOptions(atc_mode="always", allow_ai_cpu=True, validate=False)
        build_bundle(build_preset("pi0-dummy"), out, options, **QUIET)
    return out


def test_fp32_om_bundle_records_its_ai_cpu_matmuls(om_bundle: Path) -> None:
    report = json.loads((om_bundle / "report.json").read_text())
    assert report["om"]["vlm"]["soc_version"] == "Ascend310P3"
    assert any("MatMul" in op["type"] for op in report["om"]["vlm"]["ai_cpu_ops"])
    assert load_bundle(om_bundle).manifest.compiled[OM].device == "Ascend310P3"
    assert (om_bundle / "om" / "vlm.json").is_file()


def test_check_om_soc(om_bundle: Path, ascend_tools: Path, monkeypatch) -> None:
    bundle = load_bundle(om_bundle)
    monkeypatch.setenv("STANDIN_NPU_CHIP", "310P3")
    assert device_soc() == ("Ascend310P3", "npu-smi") and check_om_soc(bundle).matches is True
    monkeypatch.setenv("STANDIN_NPU_CHIP", "310P1")
    with pytest.raises(SocMismatchError, match="compiled for Ascend310P3, and this device is Ascend310P1"):
        check_om_soc(bundle)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no npu-smi, no pyACL: nothing to compare with
    assert om_soc_check(bundle).matches is None


def test_cli_refuses_an_om_for_another_soc(om_bundle: Path, ascend_tools: Path, tmp_path: Path, monkeypatch, capsys):
    from runtime import cli

    monkeypatch.setenv("STANDIN_NPU_CHIP", "310P1")
    assert cli.main(["check", "--bundle", str(om_bundle)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["bundle"]["om_soc_version"] == "Ascend310P3" and report["device_soc"] == "Ascend310P1"
    assert report["bundle"]["om_matches_device"] is False
    errors = []
    monkeypatch.setattr(cli.log, "error", lambda fmt, *a: errors.append(fmt % a if a else fmt))
    assert cli.main(["serve", "--bundle", str(om_bundle), "--backend", "acl"]) == 2
    store = tmp_path / "store"
    store.mkdir()
    assert cli.main(["install-bundle", str(om_bundle), "--store", str(store), "--no-restart"]) == 2
    assert len(errors) == 2 and all("Ascend310P3" in e and "Ascend310P1" in e for e in errors), errors
    assert list(store.iterdir()) == []
    monkeypatch.setenv("STANDIN_NPU_CHIP", "310P3")
    assert cli.main(["check", "--bundle", str(om_bundle)]) == 0


def test_cann_version_parsing() -> None:
    order = ["6.3.RC2", "7.0.alpha003", "7.0.RC1", "7.0.0", "8.0.RC3", "8.0.0", "8.1.RC1", "9.2.0-beta.2", "9.2.0"]
    keys = [parse_cann_version(v) for v in order]
    assert None not in keys and keys == sorted(keys)
    assert parse_cann_version("V100R001C19") is None and MIN_CANN == "7.0.0"


def test_check_reads_the_installed_cann_version(tmp_path: Path, monkeypatch, capsys) -> None:
    from runtime import cli

    home = tmp_path / "ascend-toolkit" / "latest"
    (home / "aarch64-linux").mkdir(parents=True)
    info = home / "aarch64-linux" / "ascend_toolkit_install.info"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.setenv("ASCEND_HOME_PATH", str(home))
    for version, status in (("8.0.RC3", 0), ("6.3.RC2", 1), ("9.2.0-beta.2", 0), ("7.0.RC1", 1), ("7.0.0", 0)):
        info.write_text(f"package_name=Ascend-cann-toolkit\nversion={version}\ninnerversion=V100R001C19SPC001B155\n")
        assert cann_version().version == version
        assert cli.main(["check"]) == status, version
        report = json.loads(capsys.readouterr().out)
        assert report["cann_version"] == version and report["cann_supported"] is (status == 0)
        assert report["cann_version_file"] == str(info)

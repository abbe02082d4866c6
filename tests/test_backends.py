"""The backend seam (runtime/backends/): prefix caches are real handles on every backend (two alive at
once give what each gives alone), backends are chosen by what they declare, and the manifest's
compiled artefacts are generic, with bundles written before still loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import QUIET

from exporter.bundle import BundleOptions, build_bundle
from exporter.presets import build_preset
from runtime.backends import REGISTRY, BackendOptions, capabilities, make_backend, resolve_backend
from runtime.backends.acl import AclError
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import MANIFEST, OM, BundleError, load_bundle
from runtime.engine import Engine, denoise
from runtime.pipeline.model_io import initial_noise, model_state, preprocess
from runtime.pipeline.observation import Observation


@pytest.fixture(scope="module")
def om_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import ascend_tools_path

    out = tmp_path_factory.mktemp("seam") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", ascend_tools_path(out.parent / "ascend-bin"))
        options = BundleOptions(precision="fp16", atc_mode="always", validate=False)  # fp32 OM: refused by acl
        build_bundle(build_preset("pi0-dummy"), out, options, **QUIET)
    return out


def model_inputs(engine: Engine, seed: int):
    """Two different observations' network inputs and noise (as the engine prepares them)."""
    obs = Observation.synthetic(engine.metadata(), seed=seed)
    spec = engine.spec
    state = model_state(spec, obs.state)
    tokens, mask = engine.prompts(None, obs.tokens, obs.token_mask)
    inputs = preprocess(spec, obs.images, state, tokens, mask)
    return inputs, initial_noise(spec, np.random.default_rng(seed))


def backend_named(name: str, bundle_path: Path):
    bundle = load_bundle(bundle_path)
    return bundle, make_backend(bundle, name, BackendOptions(threads=1))


@pytest.mark.parametrize("name", ["onnxruntime", "acl"])
def test_two_live_caches_interleaved_equal_each_alone(name: str, om_bundle: Path, request) -> None:
    if name == "acl":
        request.getfixturevalue("acl")
    bundle, backend = backend_named(name, om_bundle)
    engine = Engine.from_bundle(bundle, backend)
    (a, noise_a), (b, noise_b) = model_inputs(engine, 1), model_inputs(engine, 2)
    steps = bundle.spec.num_steps
    alone_a = denoise(backend, backend.prefix(a), a.state, noise_a, steps)
    alone_b = denoise(backend, backend.prefix(b), b.state, noise_b, steps)
    assert np.abs(alone_a - alone_b).max() > 1e-3  # two observations that the network tells apart

    cache_a, cache_b = backend.prefix(a), backend.prefix(b)  # both alive: b's VLM ran after a's
    x_a, x_b = noise_a, noise_b
    dt, t = np.float32(-1.0 / steps), np.float32(1.0)
    for _ in range(steps):  # a step on a, then a step on b, with the same times
        x_a = x_a + dt * backend.velocity(cache_a, a.state, x_a, np.array([t], np.float32))
        x_b = x_b + dt * backend.velocity(cache_b, b.state, x_b, np.array([t], np.float32))
        t = np.float32(t + dt)
    np.testing.assert_array_equal(x_a, alone_a)
    np.testing.assert_array_equal(x_b, alone_b)
    cache_a.release()
    cache_b.release()
    backend.close()


def test_acl_caches_come_from_a_bounded_pool_and_are_freed(acl, om_bundle: Path) -> None:
    bundle, backend = backend_named("acl", om_bundle)
    engine = Engine.from_bundle(bundle, backend)
    (a, _), (b, _) = model_inputs(engine, 1), model_inputs(engine, 2)
    assert backend.max_live_caches == capabilities("acl").max_live_caches == 2
    first = backend.prefix(a)
    mallocs = acl.COUNTS["malloc"]
    second = backend.prefix(b)  # the second slot is allocated when it is first needed: the cache and the state
    assert acl.COUNTS["malloc"] == mallocs + len(bundle.graphs["vlm"].outputs) + 1
    with pytest.raises(AclError, match="all 2 prefix caches"):
        backend.prefix(a)
    second.release()
    with pytest.raises(AclError, match="released"):
        backend.velocity(second, a.state, np.zeros((1, 16, 32), np.float32), np.ones(1, np.float32))
    del first  # dropping a handle gives its slot back too
    third, fourth = backend.prefix(a), backend.prefix(b)
    assert acl.COUNTS["malloc"] == mallocs + len(bundle.graphs["vlm"].outputs) + 1  # slots reused, none new
    backend.close()
    del third, fourth  # handles outliving the backend are inert
    assert acl.finalize() == 0 and acl.LEAKS == []


def test_backends_are_chosen_by_what_they_declare(acl, om_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(om_bundle)
    assert list(REGISTRY) == ["acl", "onnxruntime"]  # auto's preference: the accelerator first
    assert capabilities("acl").artefact == OM and not capabilities("acl").weights_in_host_memory
    assert capabilities("onnxruntime").artefact == "onnx" and capabilities("onnxruntime").max_live_caches is None
    assert resolve_backend(bundle) == "acl"  # pyACL importable (the stand-in) and OM files present
    onnx_only = tmp_path / "onnx-only"
    shutil.copytree(om_bundle, onnx_only)
    manifest = json.loads((onnx_only / MANIFEST).read_text())
    manifest["compiled"][OM]["files"] = {}
    (onnx_only / MANIFEST).write_text(json.dumps(manifest))
    plain = load_bundle(onnx_only)
    assert resolve_backend(plain) == "onnxruntime"
    with pytest.raises(BundleError, match="the acl backend runs om files, and this bundle has none"):
        make_backend(plain, "acl")
    with pytest.raises(BundleError, match="unknown backend 'tensorrt'"):
        make_backend(plain, "tensorrt")


def test_a_bundle_written_before_compiled_targets_still_loads(acl, om_bundle: Path, tmp_path: Path) -> None:
    """Step 14's manifests: an `atc` section and an `om` file per graph."""
    old = tmp_path / "old"
    shutil.copytree(om_bundle, old)
    manifest = json.loads((old / MANIFEST).read_text())
    target = manifest.pop("compiled")[OM]
    manifest["atc"] = {"soc_version": target["device"], "compiled": True, "script": None}
    for name, graph in manifest["graphs"].items():
        graph["om"] = target["files"][name]
    (old / MANIFEST).write_text(json.dumps(manifest))
    bundle = load_bundle(old)
    assert bundle.manifest.compiled[OM].device == target["device"]
    assert bundle.artefact(OM) == {name: old / file for name, file in target["files"].items()}
    obs = Observation.synthetic(Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)).metadata(), seed=3)
    ours, _ = Engine.from_bundle(bundle, make_backend(bundle, "acl")).infer(obs)
    theirs, _ = Engine.from_bundle(load_bundle(om_bundle), OnnxRuntimeBackend(load_bundle(om_bundle))).infer(obs)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_a_compiled_file_outside_the_checked_files_is_refused(om_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(om_bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / "om" / "other.om").write_text("x")
    manifest["compiled"][OM]["files"]["vlm"] = "om/other.om"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"om file om/other\.om is not among the manifest's checked files"):
        load_bundle(copy)

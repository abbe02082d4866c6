"""The ACL backend against the pyACL stand-in (tests/stubs/acl.py): same actions as onnxruntime (with
output names as ATC documents them, and with fused ones), the prefix cache never copied per step,
everything freed in order, on close and when any step of the set-up fails; fp32 bundles refused unless
allowed."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, QUIET, STUBS, Golden, ascend_tools_path

from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.presets import build_preset
from runtime.backends import BackendOptions
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bundle.manifest import MANIFEST, load_bundle
from runtime.engine import Engine
from runtime.pipeline.observation import Observation


@pytest.fixture(scope="module")
def om_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pi0-dummy in fp16 compiled by the atc stand-in, once for the module (tests that change it copy it)."""
    out = tmp_path_factory.mktemp("acl") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", ascend_tools_path(out.parent / "ascend-bin"))
        build_bundle(build_preset("pi0-dummy"), out, BundleOptions(precision="fp16", atc_mode="always"), **QUIET)
    return out


def fresh(acl) -> None:
    """The stand-in as in a new process: nothing held, acl.init not yet called."""
    from runtime.backends import acl as backend_module

    acl.reset()
    backend_module._initialized.discard(acl)


def edited_copy(bundle: Path, dest: Path, edit) -> Path:
    """A copy of `bundle` whose manifest `edit(manifest)` changed."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    edit(manifest)
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def observation(spec, seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    images = {
        k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for k, (_, h, w) in zip(spec.camera_keys, spec.camera_shapes, strict=True)
    }
    ids = np.zeros((1, spec.tokenizer_max_length), np.int64)
    ids[0, :3] = [2, 40, 41]
    state = rng.normal(size=spec.state_dim).astype(np.float32)
    return Observation(images, state, tokens=ids, token_mask=ids != 0, seed=seed)


@pytest.mark.parametrize("names", ["documented", "fused"])
def test_acl_gives_the_same_actions_as_onnxruntime(acl, om_bundle: Path, names: str) -> None:
    """Output names as ATC gives them for an ONNX model: `op:edge:name` (matched by name), or with
    --out_nodes `op:edge` with no name (matched by index, size, data type and dims). The host pointers
    come from bytes_to_ptr / malloc_host: no deprecated call."""
    from runtime.backends.acl import AclBackend

    acl.OUTPUT_NAMES = names
    bundle = load_bundle(om_bundle)
    obs = observation(bundle.spec, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = AclBackend(bundle)
        ours, _ = Engine.from_bundle(bundle, backend).infer(obs)
    assert not [w for w in caught if "acl.util" in str(w.message)]
    om_names = [acl.mdl.get_output_name_by_index(backend.vlm.desc, i) for i in range(3)]
    if names == "documented":
        assert all(
            re.fullmatch(rf".+:\d+:{name}", n)
            for n, name in zip(om_names, ("prefix_keys", "prefix_values", "prefix_mask"), strict=True)
        ), om_names
        _, ret = acl.mdl.get_output_index_by_name(backend.vlm.desc, "prefix_keys")
        assert ret != 0, "the bare ONNX name is not the OM output's name: exact compare"
    else:
        assert all(re.fullmatch(r"FusedOp_\d+:\d+", n) for n in om_names), om_names
    assert [s["name"] for s in backend.vlm.inputs] == [
        acl.mdl.get_input_name_by_index(backend.vlm.desc, i) for i in range(4)
    ]
    theirs, _ = Engine.from_bundle(bundle, OnnxRuntimeBackend(bundle)).infer(obs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    backend.close()
    assert acl.held() == []


def test_outputs_follow_the_om_order_by_name(acl, om_bundle: Path, tmp_path: Path) -> None:
    """A manifest listing the VLM's outputs in another order: matched by name, the datasets follow the OM."""
    from runtime.backends.acl import AclBackend

    def swap(manifest: dict) -> None:
        outputs = manifest["graphs"]["vlm"]["outputs"]
        outputs[0], outputs[2] = outputs[2], outputs[0]

    bundle = load_bundle(edited_copy(om_bundle, tmp_path / "swapped", swap))
    backend = AclBackend(bundle)
    assert [s["name"] for s in backend.vlm.outputs] == ["prefix_keys", "prefix_values", "prefix_mask"]
    obs = observation(bundle.spec, seed=2)
    ours, _ = Engine.from_bundle(bundle, backend).infer(obs)
    theirs, _ = Engine.from_bundle(load_bundle(om_bundle), OnnxRuntimeBackend(load_bundle(om_bundle))).infer(obs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    backend.close()


def test_an_output_that_matches_nothing_is_refused_naming_both_sides(acl, om_bundle: Path, tmp_path: Path) -> None:
    from runtime.backends.acl import AclBackend, AclError

    def rename(manifest: dict) -> None:
        manifest["graphs"]["vlm"]["outputs"][0]["name"] = "prefix_keys_v2"

    renamed = load_bundle(edited_copy(om_bundle, tmp_path / "renamed", rename))
    with pytest.raises(AclError) as refused:
        AclBackend(renamed)
    message = str(refused.value)
    assert re.search(r"vlm OM output 0 is '[^']+:\d+:prefix_keys' \(\d+ bytes, float16\)", message), message
    assert (
        "names none of the manifest's outputs" in message and "the manifest's output 0 is 'prefix_keys_v2'" in message
    )
    assert acl.held() == []

    # No output name (--out_nodes, fused ops): by index, and the manifest's output 0 is then the mask.
    def swap(manifest: dict) -> None:
        outputs = manifest["graphs"]["vlm"]["outputs"]
        outputs[0], outputs[2] = outputs[2], outputs[0]

    swapped = load_bundle(edited_copy(om_bundle, tmp_path / "swapped", swap))
    fresh(acl)
    acl.OUTPUT_NAMES = "fused"
    with pytest.raises(AclError) as refused:
        AclBackend(swapped)
    message = str(refused.value)
    assert re.search(r"vlm OM output 0 is 'FusedOp_\d+:0' \(\d+ bytes, float16\)", message), message
    assert "with no output name; the manifest's output 0 is 'prefix_mask'" in message and "bool" in message
    assert acl.held() == []


# Every call AclBackend.__init__ makes on the pi0-dummy bundle (test_every_set_up_call_is_covered keeps it whole).
SET_UP_CALLS = (
    "acl.init",
    "acl.rt.set_device",
    "acl.rt.create_context",
    "acl.rt.create_stream",
    "acl.mdl.load_from_file",
    "acl.mdl.create_desc",
    "acl.mdl.get_desc",
    "acl.mdl.get_num_inputs",
    "acl.mdl.get_input_name_by_index",
    "acl.mdl.get_input_size_by_index",
    "acl.mdl.get_input_data_type",
    "acl.mdl.get_num_outputs",
    "acl.mdl.get_output_name_by_index",
    "acl.mdl.get_output_size_by_index",
    "acl.mdl.get_output_data_type",
    "acl.rt.malloc",
    "acl.rt.malloc_host",
    "acl.mdl.create_dataset",
    "acl.create_data_buffer",
    "acl.mdl.add_dataset_buffer",
)
_set_up_counts: dict[str, int] = {}


def set_up_counts(acl, bundle) -> dict[str, int]:
    """How often a successful set-up makes each call (measured once)."""
    from runtime.backends.acl import AclBackend

    if not _set_up_counts:
        fresh(acl)
        backend = AclBackend(bundle)
        _set_up_counts.update(acl.CALLED)
        backend.close()
    return _set_up_counts


def test_every_set_up_call_is_covered(acl, om_bundle: Path) -> None:
    assert set(set_up_counts(acl, load_bundle(om_bundle))) == set(SET_UP_CALLS)


@pytest.mark.parametrize("call", SET_UP_CALLS)
def test_a_failed_set_up_releases_everything(acl, om_bundle: Path, call: str) -> None:
    """The call failing at its first and at its last use in set-up: AclError, and nothing left held
    (device, context, stream, models, descriptions, buffers, datasets); then a set-up succeeds."""
    from runtime.backends.acl import AclBackend, AclError

    bundle = load_bundle(om_bundle)
    count = set_up_counts(acl, bundle)[call]
    for nth in sorted({1, count}):
        fresh(acl)
        acl.FAIL_AT = f"{call}#{nth}"
        with pytest.raises(AclError):
            AclBackend(bundle)
        assert acl.COUNTS["injected"] == 1, f"{call}#{nth} was not reached"
        assert acl.held() == [], f"{call}#{nth}"
    acl.FAIL_AT = None
    backend = AclBackend(bundle)  # the process can set up again: nothing stale
    backend.close()
    assert acl.held() == [] and acl.finalize() == 0


def test_close_carries_on_past_a_failed_release(acl, om_bundle: Path) -> None:
    from runtime.backends.acl import AclBackend, AclError

    backend = AclBackend(load_bundle(om_bundle))
    acl.FAIL_AT = f"acl.mdl.unload#{acl.CALLED['acl.mdl.unload'] + 1}"
    with pytest.raises(AclError, match=r"acl\.mdl\.unload failed"):
        backend.close()
    assert acl.held() == ["1 models"]  # only the one whose unload failed
    backend.close()  # a second close does nothing


def test_host_pointers_follow_the_documented_calls(acl) -> None:
    assert acl.init() == 0 and acl.rt.set_device(0) == 0
    context, _ = acl.rt.create_context(0)
    with pytest.warns(DeprecationWarning, match="Please use acl.util.bytes_to_ptr instead"):
        acl.util.numpy_to_ptr(np.zeros(4, np.float32))
    device, _ = acl.rt.malloc(16, 0)
    data = np.arange(4, dtype=np.float32).tobytes()
    assert acl.rt.memcpy(device, 16, acl.util.bytes_to_ptr(data), 16, 1) == 0
    assert acl.rt.memcpy(acl.util.bytes_to_ptr(data), 16, device, 16, 2) != 0, "bytes are not writable"
    host, ret = acl.rt.malloc_host(16)
    assert ret == 0 and acl.rt.memcpy(host, 16, device, 16, 2) == 0
    assert np.frombuffer(acl.util.ptr_to_bytes(host, 16), np.float32).tolist() == [0, 1, 2, 3]
    assert acl.rt.memcpy(host, 32, device, 32, 2) != 0, "more than the device buffer holds"
    assert acl.rt.free(host) != 0, "malloc_host memory is freed by free_host"
    assert acl.rt.free(device) == 0 and acl.rt.destroy_context(context) == 0 and acl.rt.reset_device(0) == 0
    assert acl.finalize() != 0 and acl.LEAKS == ["1 host allocations"]
    assert acl.rt.free_host(host) == 0 and acl.finalize() == 0


def test_the_prefix_cache_stays_on_the_device(acl, om_bundle: Path) -> None:
    from runtime.backends.acl import AclBackend

    bundle = load_bundle(om_bundle)
    engine = Engine.from_bundle(bundle, AclBackend(bundle))
    obs = observation(bundle.spec, seed=1)
    acl.COUNTS.clear()
    engine.infer(obs)
    steps = bundle.spec.num_steps
    # Per inference: 4 VLM inputs and the state once; x_t and t per step; the velocity back per step.
    assert acl.COUNTS["H2D"] == 4 + 1 + 2 * steps
    assert acl.COUNTS["D2H"] == steps and acl.COUNTS["D2D"] == 0
    assert acl.COUNTS["execute"] == 1 + steps and acl.COUNTS["malloc"] == 0
    size = bundle.tensor_bytes
    vlm_in = sum(size[name] for name in ("images", "image_masks", "tokens", "token_mask"))
    expected = vlm_in + size["state"] + steps * (size["x_t"] + size["t"])
    assert acl.COUNTS["H2D_bytes"] == expected
    # One copy of the cache alone would be more than everything that went in after the VLM's inputs.
    assert size["prefix_keys"] + size["prefix_values"] > expected - vlm_in


def test_device_memory_is_what_the_stand_in_holds(acl, om_bundle: Path) -> None:
    """`device_memory` reads `acl.rt.get_mem_info(ACL_DDR_MEM)` in the engine's context (cann-facts §9): used
    is what the backend allocated on the device, total what the device offers."""
    from runtime.backends.acl import AclBackend

    bundle = load_bundle(om_bundle)
    engine = Engine.from_bundle(bundle, AclBackend(bundle))
    engine.infer(observation(bundle.spec, seed=1))
    used, total = engine.device_memory()
    assert total == acl.DEVICE_MEMORY_TOTAL
    assert used == sum(len(block) for block in acl._S.memory.values()) > 0
    assert acl.CALLED["acl.rt.get_mem_info"] == 1
    engine.close()


def test_close_frees_everything_in_order(acl, om_bundle: Path) -> None:
    from runtime.backends.acl import AclBackend

    bundle = load_bundle(om_bundle)
    backend = AclBackend(bundle)
    result = {}

    def run() -> None:  # the server's engine runs in a worker thread: contexts are per thread
        result["actions"] = Engine.from_bundle(bundle, backend).infer(observation(bundle.spec, seed=0))[0]

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert np.isfinite(result["actions"]).all()
    backend.close()
    assert acl.LEAKS == []
    assert acl.finalize() == 0  # nothing left allocated: finalize (which the backend leaves to exit) succeeds


def test_leaks_are_caught_by_the_stand_in(acl) -> None:
    assert acl.init() == 0 and acl.rt.set_device(0) == 0
    _, ret = acl.rt.create_context(0)
    ptr, ret = acl.rt.malloc(64, 0)
    assert ret == 0 and acl.finalize() != 0 and "1 device allocations" in acl.LEAKS[0]
    assert acl.rt.memcpy(ptr, 64, ptr, 64, 1) != 0, "H2D from a device pointer must be refused"


def test_golden_fixture_through_acl(acl, tmp_path: Path, ascend_tools: Path) -> None:
    """An fp32 bundle: refused by default (every matmul on the AI CPU), served with allow_ai_cpu."""
    from runtime.backends.acl import AclBackend, AclError

    golden = Golden("lerobot-pi0-tiny-aloha-sim")
    out = tmp_path / "bundle"
    options = BundleOptions(atc_mode="always", allow_ai_cpu=True)  # fp32: the golden actions are fp32's
    build_bundle(load_checkpoint(FIXTURES / golden.name / "checkpoint"), out, options, **QUIET)
    bundle = load_bundle(out)
    with pytest.raises(AclError, match=r"this bundle is fp32: .*AI CPU.*--allow-ai-cpu"):
        AclBackend(bundle)
    assert acl.held() == [] and acl.CALLED["acl.init"] == 0, "refused before anything is acquired"
    obs = Observation(
        golden.images, golden.state, tokens=golden.tokens, token_mask=golden.token_mask, noise=golden.noise
    )
    actions, _ = Engine.from_bundle(bundle, AclBackend(bundle, BackendOptions(allow_ai_cpu=True))).infer(obs)
    assert np.abs(actions - golden.actions_fp32[0]).max() <= 1e-4


def test_daemon_serves_on_the_acl_backend(om_bundle: Path, monkeypatch: pytest.MonkeyPatch, start_daemon) -> None:
    from pi0_client.client import PolicyClient

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUBS), os.environ.get("PYTHONPATH", "")]))
    d = start_daemon(om_bundle, "--backend", "acl")
    with PolicyClient(d.endpoint, timeout_s=30) as client:
        assert client.metadata().backend == "acl"
        obs = observation(load_bundle(om_bundle).spec, seed=0)
        result = client.infer(Observation(obs.images, obs.state, tokens=obs.tokens).to_dict())
        assert result["actions"].shape == (50, 14)
        assert client.stats()["device_memory_bytes"]["total"] > 0  # aclrtGetMemInfo, through the stand-in
    assert d.stop() == 0
    assert "acl" in d.log()


def test_openpi_pi05_fixture_through_acl(acl, tmp_path: Path, ascend_tools: Path) -> None:
    """pi0.5's expert graph takes no state: the ACL backend copies x_t and t per step and nothing else."""
    from runtime.backends.acl import AclBackend

    fixture = FIXTURES / "openpi-pi05-tiny"
    data = np.load(fixture / "golden.npz", allow_pickle=False)
    out = tmp_path / "bundle"
    policy = load_checkpoint(fixture / "checkpoint", openpi_config="pi0_aloha_sim", max_token_len=80)
    build_bundle(policy, out, BundleOptions(atc_mode="always", allow_ai_cpu=True), **QUIET)  # fp32, vs fp32 golden
    bundle = load_bundle(out)
    images = {k.split("::", 1)[1]: data[k][0] for k in data.files if k.startswith("image::")}
    obs = Observation(
        images, data["state"][0], tokens=data["lang_tokens"], token_mask=data["lang_masks"], noise=data["noise"]
    )
    acl.COUNTS.clear()
    backend = AclBackend(bundle, BackendOptions(allow_ai_cpu=True))
    actions, _ = Engine.from_bundle(bundle, backend).infer(obs)
    assert np.abs(actions - data["actions_fp32"][0]).max() <= 1e-4
    steps = bundle.spec.num_steps
    assert acl.COUNTS["H2D"] == 4 + 2 * steps and acl.COUNTS["D2H"] == steps

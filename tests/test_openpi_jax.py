"""openpi checkpoints straight from JAX training (tests/fixtures/openpi-jax-*-tiny; their READMEs say what
ran): a pi0 full fine-tune, a pi0 LoRA one and a pi0.5, through `pi0-export bundle` + `pi0-runtime infer`, against openpi's
own JAX policy; the LoRA merge proven against openpi's merged run and, in every export's report, against
the unmerged LoRA forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, check_actions, export_cli, infer_cli, inspect_cli

from exporter.checkpoint import CheckpointError, load_checkpoint
from exporter.lora import lora_eqns
from exporter.readers import openpi_jax
from pi0_client import PolicyClient

FULL, LORA, PI05 = "openpi-jax-pi0-tiny", "openpi-jax-pi0-lora-tiny", "openpi-jax-pi05-tiny"
TRAINING_CONFIG = {  # what the fixtures' training configs knew (pi0_aloha_sim's; pi0.5: 80 tokens, its tokenizer)
    FULL: ("--aloha", "--action-horizon", "16", "--max-token-len", "16"),
    LORA: ("--aloha", "--action-horizon", "16", "--max-token-len", "16"),
    PI05: ("--aloha", "--action-horizon", "16", "--max-token-len", "80", "--tokenizer", str(FIXTURES / PI05 / "tokenizer.model")),
}  # fmt: skip


def golden(name: str) -> dict:
    return dict(np.load(FIXTURES / name / "golden.npz", allow_pickle=False))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: export_cli(
            FIXTURES / name / "checkpoint", tmp_path_factory.mktemp(name) / "b", "fp32", *TRAINING_CONFIG[name]
        )
        for name in (FULL, LORA, PI05)
    }


@pytest.mark.parametrize("name", [FULL, LORA, PI05])
def test_cli_export_then_infer(name: str, bundles, tmp_path: Path) -> None:
    d = golden(name)
    images = {k.split("::", 1)[1]: v[0] for k, v in d.items() if k.startswith("image::")}  # openpi's ALOHA names
    arrays = {
        **images,
        "observation.state": d["state"][0],
        "lang_tokens": d["lang_tokens"],
        "lang_masks": d["lang_masks"],
    }
    actions = infer_cli(bundles[name], arrays, d["noise"], tmp_path)
    check_actions(actions, d["actions_fp32"][0], "fp32")  # openpi's JAX policy with the adapters live
    if name == LORA:
        check_actions(actions, d["actions_merged_fp32"][0], "fp32")  # openpi's own merge


def test_pi05_daemon_puts_the_state_into_the_prompt_as_openpi_did(bundles, start_daemon) -> None:
    """The prompt as text: the daemon discretizes the quantile-normalized state into it, as openpi's
    `TokenizePrompt(discrete_state_input=True)` did for the golden's tokens."""
    d = golden(PI05)
    images = {k.split("::", 1)[1]: v[0] for k, v in d.items() if k.startswith("image::")}
    daemon = start_daemon(bundles[PI05])
    with PolicyClient(daemon.endpoint, timeout_s=60) as client:
        meta = client.metadata()
        assert meta.conventions == "openpi" and meta.prompt.tokenizer
        reply = client.infer(
            {**images, "observation.state": d["state"][0], "prompt": "Transfer cube", "noise": d["noise"]}
        )
    check_actions(reply["actions"], d["actions_fp32"][0], "fp32")


def test_the_report_proves_the_merge_and_the_manifest_records_it(bundles) -> None:
    report = json.loads((bundles[LORA] / "report.json").read_text())
    assert report["passed"] and report["results"]["vs_lora_forward"]["max_abs"] <= 1e-4
    lora = json.loads((bundles[LORA] / "manifest.json").read_text())["checkpoint"]["lora"]
    assert lora["merged"] and len(lora["adapters"]) == 2 * 4 * 7  # 2 towers x 4 layers x (q k v o gate up down)
    kinds = {(a["module"].split(".")[0], a["rank"], a["alpha"]) for a in lora["adapters"]}
    assert kinds == {("llm", 4, 4.0), ("llm", 4, None), ("expert", 8, 8.0), ("expert", 8, None)}  # None: FeedForward
    assert "vs_lora_forward" not in json.loads((bundles[FULL] / "report.json").read_text())["results"]


def test_attention_output_adapters_sum_over_heads() -> None:
    """openpi's derived eqns for BTNH,NHD->BTD contract the heads in both factors: a per-head merge
    (a[n] @ b[n]) would be wrong, and the reader's merge is not that."""
    assert lora_eqns("BTNH,NHD->BTD") == ("BTNH,NHL->BTL", "BTL,NLD->BTD")
    assert lora_eqns("BTD,NDH->BTNH") == ("BTD,NDL->BTNL", "BTNL,NLH->BTNH")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 16, 4)), rng.normal(size=(8, 4, 64))
    adapter = openpi_jax.Adapter("o", "BTNH,NHD->BTD", a, b, 1.0, (8, 16), None, 4, 4.0, "test")
    merged = adapter.delta().numpy().T.reshape(8, 16, 64)  # [n, h, d]
    np.testing.assert_allclose(merged, np.einsum("nhl,ld->nhd", a, b.sum(0)), atol=1e-12)
    assert not np.allclose(merged, np.einsum("nhl,nld->nhd", a, b))


def test_what_a_jax_checkpoint_cannot_tell_is_asked_for() -> None:
    with pytest.raises(CheckpointError, match=r"name it with --openpi-config NAME, one of: .*pi0_aloha_sim"):
        load_checkpoint(FIXTURES / FULL / "checkpoint")
    # no weight's shape shows the action horizon: the named config's applies (pi0_aloha_sim: Pi0Config's 50)
    assert load_checkpoint(FIXTURES / FULL / "checkpoint", openpi_config="pi0_aloha_sim").spec.chunk_size == 50


def test_inspect_reads_a_jax_pi05() -> None:
    report = inspect_cli(FIXTURES / PI05 / "checkpoint", *TRAINING_CONFIG[PI05][:-2])  # no --tokenizer
    assert report["format"] == "openpi-jax" and report["model_type"] == "pi05" and "lora" not in report
    assert report["spec"]["state_dim"] == 14 and report["conventions"]["name"] == "openpi"


def test_an_adapter_that_cannot_be_placed_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    read = openpi_jax.read_params

    def with_a_stray_adapter(params: Path) -> dict:
        arrays = read(params)
        arrays["PaliGemma/llm/layers/attn/qkv_einsum/lora_a"] = np.zeros((4, 3, 8, 64, 4), np.float32)
        return arrays

    monkeypatch.setattr(openpi_jax, "read_params", with_a_stray_adapter)
    with pytest.raises(CheckpointError, match=r"cannot place: \['PaliGemma/llm/layers/attn/qkv_einsum/lora_a'\]"):
        load_checkpoint(FIXTURES / LORA / "checkpoint", openpi_config="pi0_aloha_sim", action_horizon=16)


def test_inspect_lists_the_adapters() -> None:
    report = inspect_cli(FIXTURES / LORA / "checkpoint", *TRAINING_CONFIG[LORA])
    assert report["format"] == "openpi-jax" and report["lora"]["merged"]
    assert {"module": "llm.layers.0.self_attn.o_proj", "from": "PaliGemma/llm/layers/attn/attn_vec_einsum/lora_{a,b}",
            "rank": 4, "alpha": 4.0, "scale": 1.0} in report["lora"]["adapters"]  # fmt: skip

"""LeRobot >= 0.4 pi0 and pi0.5 checkpoints: `config.json` (`"type": "pi0"` or `"pi05"`), `model.safetensors`
(keys under `model.`, the later transformers layout; the token embedding may be stored only as the tied
`lm_head`), and the processor pipelines saved beside them: `policy_preprocessor.json` and
`policy_postprocessor.json`, whose normalizer steps name the safetensors files that hold the statistics.

The pipelines are read step by step from the JSON (their order and indices differ between pi0 and pi0.5
and between LeRobot versions). Every step either changes numbers in a way this reader reproduces through
the runtime's conventions set `lerobot-0.4`, or changes nothing the bundle sees (batching, device
placement); any other step is refused by name, so nothing is silently dropped. LeRobot 0.4.4 has no
numeric relative/delta action step for these policies (its `map_delta_action_*` steps rename robot
action keys on the robot side), so none is applied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointError, LoadedPolicy
from exporter.safetensors_io import SafetensorsFile
from exporter.weights import build_model, check_spec_fits, read_weights
from runtime.bundle.conventions import LEROBOT_04
from runtime.bundle.spec import NormStats, PolicySpec

FORMAT = "lerobot-0.4"
SOURCE = "lerobot"
OPTIONS: tuple[str, ...] = ()  # `load` takes none
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
TYPES = {"pi0": False, "pi05": True}  # LeRobot's policy type -> pi0.5
MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantiles", "QUANTILE10": "quantile10"}
EMPTY_CAMERA = re.compile(r"^observation\.images\.empty_camera_\d+$")
STATE, ACTION = "observation.state", "action"
# What each known step does to the numbers, as `inspect` reports it.
PRE_STEPS = {
    "rename_observations_processor": "renames observation keys (cameras the robot sends under other names)",
    "to_batch_processor": "adds the batch dimension (the runtime's own)",
    "pi0_new_line_processor": 'ends the task with "\\n" (conventions lerobot-0.4: prompt)',
    "normalizer_processor": "normalizes the state (its statistics into the bundle)",
    "pi05_prepare_state_tokenizer_processor_step": "writes the normalized state, padded to max_state_dim, into the prompt as 256 bins",
    "tokenizer_processor": "tokenizes the task: BOS first, right-padded to max_length (the tokenizer given by path)",
    "device_processor": "moves tensors to a device (nothing for the bundle)",
}
POST_STEPS = {
    "unnormalizer_processor": "un-normalizes the actions (its statistics into the bundle)",
    "device_processor": "moves tensors to a device (nothing for the bundle)",
}


def detect(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and (directory / PREPROCESSOR).is_file() and "type" in json.loads(config.read_text())


@dataclass
class Pipeline:
    """The two pipelines as read: steps by registry name, in order, with their configs and state files."""

    pre: list[dict[str, Any]]
    post: list[dict[str, Any]]

    @classmethod
    def read(cls, directory: Path) -> Pipeline:
        pipelines = []
        for name, known in ((PREPROCESSOR, PRE_STEPS), (POSTPROCESSOR, POST_STEPS)):
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory}: {name} is missing (LeRobot >= 0.4 saves it beside the weights)")
            steps = json.loads(path.read_text()).get("steps", [])
            for index, step in enumerate(steps):
                registry = step.get("registry_name")
                if registry not in known:
                    raise CheckpointError(
                        f"{path}: step {index} {registry!r} is not one this exporter knows how to reproduce; "
                        f"known: {sorted(known)}"
                    )
            pipelines.append(steps)
        return cls(*pipelines)

    def find(self, steps: list[dict[str, Any]], registry: str) -> tuple[int, dict[str, Any]] | None:
        found = [(i, s) for i, s in enumerate(steps) if s["registry_name"] == registry]
        if len(found) > 1:
            raise CheckpointError(f"the pipeline holds {registry!r} {len(found)} times; a checkpoint has one")
        return found[0] if found else None

    def describe(self) -> dict[str, list[str]]:
        return {
            PREPROCESSOR: [
                f"{i}: {s['registry_name']}: {PRE_STEPS[s['registry_name']]}" for i, s in enumerate(self.pre)
            ],
            POSTPROCESSOR: [
                f"{i}: {s['registry_name']}: {POST_STEPS[s['registry_name']]}" for i, s in enumerate(self.post)
            ],
        }


def _stats(directory: Path, step: dict[str, Any], feature: str, kind: str) -> NormStats | None:
    """A normalizer step's statistics for one feature, in the mode its norm_map gives the feature's kind."""
    config = step["config"]
    mode = config.get("norm_map", {}).get(kind, "IDENTITY")
    if mode == "IDENTITY":
        return None
    if mode not in MODES:
        raise CheckpointError(f"{kind} normalization {mode!r} is not supported (IDENTITY, {', '.join(MODES)})")
    if "state_file" not in step:
        raise CheckpointError(f"the {step['registry_name']} step names no state_file with its statistics")
    stats = SafetensorsFile(directory / step["state_file"])
    values = {
        key.removeprefix(f"{feature}."): stats.tensor(key, torch.float32).numpy()
        for key in stats.tensor_names()
        if key.startswith(f"{feature}.")
    }
    return NormStats(
        mean=values.get("mean"),
        std=values.get("std"),
        q01=values.get("q01"),
        q99=values.get("q99"),
        q10=values.get("q10"),
        q90=values.get("q90"),
        eps=float(config.get("eps", LEROBOT_04.norm_eps)),
        mode=MODES[mode],
        eps_rule="lerobot",
    )


def load(directory: Path, dtype: torch.dtype = torch.float32) -> LoadedPolicy:
    config = json.loads((directory / "config.json").read_text())
    kind = config.get("type")
    if kind not in TYPES:
        raise CheckpointError(f"{directory}/config.json is a LeRobot {kind!r} policy, not pi0 or pi05")
    if not (directory / PREPROCESSOR).is_file():
        raise CheckpointError(
            f"{directory} is a LeRobot v0.3 checkpoint (statistics inside model.safetensors, no {PREPROCESSOR}): "
            "read it as lerobot-0.3 (--format lerobot-0.3, or let the format be detected)"
        )
    pipeline = Pipeline.read(directory)
    normalizer = pipeline.find(pipeline.pre, "normalizer_processor")
    unnormalizer = pipeline.find(pipeline.post, "unnormalizer_processor")
    tokenizer = pipeline.find(pipeline.pre, "tokenizer_processor")
    state_prompt = pipeline.find(pipeline.pre, "pi05_prepare_state_tokenizer_processor_step")
    new_line = pipeline.find(pipeline.pre, "pi0_new_line_processor")
    if tokenizer is None or normalizer is None or unnormalizer is None:
        raise CheckpointError(f"{directory}: a pi0 pipeline needs a tokenizer, a normalizer and an unnormalizer step")
    pi05 = TYPES[kind]
    if pi05 != (state_prompt is not None) or (
        state_prompt is not None and not normalizer[0] < state_prompt[0] < tokenizer[0]
    ):
        raise CheckpointError(
            f"{directory}: a {kind} pipeline this exporter reproduces writes the normalized state into the prompt "
            "(normalizer, then pi05_prepare_state_tokenizer_processor_step, then tokenizer) for pi05 only"
        )
    if pi05 == (new_line is not None) or (new_line is not None and new_line[0] > tokenizer[0]):
        raise CheckpointError(
            f"{directory}: pi0_new_line_processor belongs before the tokenizer, in pi0's pipeline only"
        )
    if (
        state_prompt is not None
        and state_prompt[1]["config"].get("max_state_dim", config["max_state_dim"]) != config["max_state_dim"]
    ):
        raise CheckpointError(f"{directory}: the state prompt step pads to another max_state_dim than the model's")
    for _, step in (normalizer, unnormalizer):
        if step["config"].get("norm_map", {}).get("VISUAL", "IDENTITY") != "IDENTITY":
            raise CheckpointError("VISUAL normalization other than IDENTITY is not supported")
    for steps in (pipeline.pre, pipeline.post):
        for step in steps:
            if step["registry_name"] == "device_processor" and step["config"].get("float_dtype") not in (
                None,
                "float32",
            ):
                raise CheckpointError(f"device_processor casts to {step['config']['float_dtype']}: not supported")
    rename = pipeline.find(pipeline.pre, "rename_observations_processor")
    rename_map = rename[1]["config"].get("rename_map", {}) if rename else {}
    features = config["input_features"]
    cameras = [k for k, v in features.items() if v["type"] == "VISUAL" and not EMPTY_CAMERA.match(k)]
    unsupported = {source: target for source, target in rename_map.items() if target not in cameras}
    if unsupported:
        raise CheckpointError(f"rename_observations_processor renames {unsupported}: only camera renames are supported")
    sent_as = {target: source for source, target in rename_map.items()}  # the robot sends the source names

    weights, names, extras = read_weights(directory / "model.safetensors")
    if extras:
        raise CheckpointError(f"{directory}: unexpected tensor {next(iter(extras))} (statistics live in the pipelines)")
    model = build_model(weights, names, dtype)
    if model.dims.pi05 != pi05:
        raise CheckpointError(f"config.json says {kind}, the weights are {model.dims.model_type}")
    budget = int(tokenizer[1]["config"].get("max_length", config.get("tokenizer_max_length", 48)))
    height, width = config.get("image_resolution", (224, 224))
    spec = PolicySpec(
        conventions=LEROBOT_04.name,
        camera_keys=tuple(sent_as.get(k, k) for k in cameras),
        camera_shapes=tuple(tuple(features[k]["shape"]) for k in cameras),
        empty_cameras=int(config.get("empty_cameras", 0)),
        image_size=(height, width),
        state_dim=features[STATE]["shape"][0],
        action_dim=config["output_features"][ACTION]["shape"][0],
        max_state_dim=config["max_state_dim"],
        max_action_dim=config["max_action_dim"],
        chunk_size=config["chunk_size"],  # LeRobot >= 0.4 denoises chunk_size tokens
        num_steps=config.get("num_inference_steps", 10),
        tokenizer_max_length=budget,
        adapt_to_pi_aloha=False,
        state_norm=_stats(directory, normalizer[1], STATE, "STATE"),
        action_norm=_stats(directory, unnormalizer[1], ACTION, "ACTION"),
        state_in_prompt=pi05,
    )
    check_spec_fits(spec, model)
    details = {"pipeline": pipeline.describe(), "tokenizer_name": tokenizer[1]["config"].get("tokenizer_name")}
    return LoadedPolicy(model=model, spec=spec, source=SOURCE, details=details)

"""LeRobot >= 0.4 pi0 and pi0.5 checkpoints, one reader for every version: `config.json` (`"type": "pi0"` or
`"pi05"`), `model.safetensors` (keys under `model.`, the later transformers layout) and the processor pipelines
saved beside them: `policy_preprocessor.json` and `policy_postprocessor.json`, whose normalizer steps name the
safetensors files that hold the statistics. A `LeRobotVersion` says what differs: the runtime's conventions set
and the steps that version saves. `lerobot_v04` and `lerobot_v06` are this reader for theirs.

The pipelines are read step by step from the JSON (their order and indices differ between pi0 and pi0.5
and between LeRobot versions). Every step either changes numbers in a way this reader reproduces through
the version's conventions set, or changes nothing the bundle sees (batching, device placement); any other
step is refused by name, so nothing is silently dropped.

Which version saved a checkpoint is told by its files: LeRobot 0.5.1 added the relative-action steps to
every pi0/pi0.5 pipeline (enabled or not) and `use_relative_actions` to config.json; LeRobot 0.5.0, which
already changed the image padding and pi0.5's prompt state, moved to transformers 5, whose PaliGemma stores
the language model's `embed_tokens` apart from an untied `lm_head` (0.4 stores only the tied `lm_head`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import CheckpointError, LoadedPolicy
from exporter.safetensors_io import SafetensorsFile
from exporter.weights import build_model, canonical_key, check_spec_fits, module_name, read_weights
from runtime.bundle.conventions import Conventions
from runtime.bundle.spec import NormStats, PolicySpec

SOURCE = "lerobot"
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
TYPES = {"pi0": False, "pi05": True}  # LeRobot's policy type -> pi0.5
MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantiles", "QUANTILE10": "quantile10"}
EMPTY_CAMERA = re.compile(r"^observation\.images\.empty_camera_\d+$")
STATE, ACTION = "observation.state", "action"
RELATIVE, ABSOLUTE = "relative_actions_processor", "absolute_actions_processor"  # LeRobot >= 0.5.1


def _pre_steps(conventions: Conventions, relative_actions: bool) -> dict[str, str]:
    """What each known preprocessor step does to the numbers, as `inspect` reports it."""
    state = "padded to max_state_dim" if conventions.prompt_state == "padded" else "the robot's dims"
    steps = {
        "rename_observations_processor": "renames observation keys (cameras the robot sends under other names)",
        "to_batch_processor": "adds the batch dimension (the runtime's own)",
        "pi0_new_line_processor": f'ends the task with "\\n" (conventions {conventions.name}: prompt)',
        "normalizer_processor": "normalizes the state (its statistics into the bundle)",
        "pi05_prepare_state_tokenizer_processor_step": f"writes the normalized state, {state}, into the prompt "
        "as 256 bins",
        "tokenizer_processor": "tokenizes the task: BOS first, right-padded to max_length (the tokenizer given by path)",
        "device_processor": "moves tensors to a device (nothing for the bundle)",
    }
    if relative_actions:
        steps[RELATIVE] = (
            "keeps the raw state for absolute_actions_processor (makes training actions relative; "
            "nothing else at inference)"
        )
    return steps


def _post_steps(relative_actions: bool) -> dict[str, str]:
    """What each known postprocessor step does to the numbers, as `inspect` reports it."""
    steps = {
        "unnormalizer_processor": "un-normalizes the actions (its statistics into the bundle)",
        "device_processor": "moves tensors to a device (nothing for the bundle)",
    }
    if relative_actions:
        steps[ABSOLUTE] = (
            "when enabled, adds the raw state to the un-normalized actions on the relative dims "
            "(the bundle's delta_action_mask, delta_reference raw_state)"
        )
    return steps


def saved_after_04(directory: Path, config: dict[str, Any]) -> str | None:
    """What shows that LeRobot >= 0.5 saved the checkpoint, in words; None for a LeRobot 0.4 one."""
    for name in (PREPROCESSOR, POSTPROCESSOR):
        path = directory / name
        if path.is_file():
            steps = {step.get("registry_name") for step in json.loads(path.read_text()).get("steps", [])}
            found = sorted(steps & {RELATIVE, ABSOLUTE})
            if found:
                return f"{name} holds {found[0]}"
    if "use_relative_actions" in config:
        return "config.json has use_relative_actions"
    weights = directory / "model.safetensors"
    if weights.is_file() and any(
        module_name(canonical_key(key)) == "embed_tokens.weight" for key in SafetensorsFile(weights).tensor_names()
    ):
        return "model.safetensors stores embed_tokens apart from lm_head, as transformers 5 does"
    return None


@dataclass
class Pipeline:
    """The two pipelines as read: steps by registry name, in order, with their configs and state files."""

    pre: list[dict[str, Any]]
    post: list[dict[str, Any]]
    known: dict[str, dict[str, str]] = field(default_factory=dict)  # file name -> {step: what it does}

    @classmethod
    def read(cls, directory: Path, known: dict[str, dict[str, str]]) -> Pipeline:
        pipelines = []
        for name in (PREPROCESSOR, POSTPROCESSOR):
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory}: {name} is missing (LeRobot >= 0.4 saves it beside the weights)")
            steps = json.loads(path.read_text()).get("steps", [])
            for index, step in enumerate(steps):
                registry = step.get("registry_name")
                if registry not in known[name]:
                    raise CheckpointError(
                        f"{path}: step {index} {registry!r} is not one this exporter knows how to reproduce; "
                        f"known: {sorted(known[name])}"
                    )
            pipelines.append(steps)
        return cls(*pipelines, known=known)

    def find(self, steps: list[dict[str, Any]], registry: str) -> tuple[int, dict[str, Any]] | None:
        found = [(i, s) for i, s in enumerate(steps) if s["registry_name"] == registry]
        if len(found) > 1:
            raise CheckpointError(f"the pipeline holds {registry!r} {len(found)} times; a checkpoint has one")
        return found[0] if found else None

    def describe(self) -> dict[str, list[str]]:
        return {
            name: [f"{i}: {s['registry_name']}: {self.known[name][s['registry_name']]}" for i, s in enumerate(steps)]
            for name, steps in ((PREPROCESSOR, self.pre), (POSTPROCESSOR, self.post))
        }


def _stats(directory: Path, step: dict[str, Any], feature: str, kind: str, eps: float) -> NormStats | None:
    """A normalizer step's statistics for one feature, in the mode its norm_map gives the feature's kind
    (LeRobot >= 0.5's `count` and `q50` are not read)."""
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
        eps=float(config.get("eps", eps)),
        mode=MODES[mode],
        eps_rule="lerobot",
    )


def _switch(found: tuple[int, dict[str, Any]] | None) -> str:
    return "missing" if found is None else "enabled" if found[1]["config"].get("enabled", False) else "disabled"


def relative_mask(
    directory: Path, pipeline: Pipeline, config: dict[str, Any], normalizer: int, unnormalizer: int
) -> tuple[bool, ...] | None:
    """The action dims LeRobot >= 0.5.1 predicts relative to the raw state (`relative_actions_processor` and
    `absolute_actions_processor`, both enabled), or None where the actions are absolute. As LeRobot's
    `_build_mask`: a dim stays absolute when an `exclude_joints` entry, lower-cased, is (a substring of) its
    lower-cased action name; no `action_names` or no `exclude_joints`: every dim relative."""
    relative, absolute = pipeline.find(pipeline.pre, RELATIVE), pipeline.find(pipeline.post, ABSOLUTE)
    enabled = _switch(relative) == "enabled"
    if enabled != (_switch(absolute) == "enabled"):
        raise CheckpointError(
            f"{directory}: {RELATIVE} is {_switch(relative)} in {PREPROCESSOR} but {ABSOLUTE} is "
            f"{_switch(absolute)} in {POSTPROCESSOR}: relative actions need both enabled (or neither)"
        )
    if bool(config.get("use_relative_actions", enabled)) != enabled:
        raise CheckpointError(
            f"{directory}: config.json has use_relative_actions {config['use_relative_actions']} but the "
            f"pipelines' relative action steps are {_switch(relative)}"
        )
    if relative is None or absolute is None or not enabled:
        return None
    if not relative[0] < normalizer or not absolute[0] > unnormalizer:
        raise CheckpointError(
            f"{directory}: relative actions are reproduced with {RELATIVE} before the normalizer (it keeps the raw "
            f"state) and {ABSOLUTE} after the unnormalizer"
        )
    action_dim, state_dim = config["output_features"][ACTION]["shape"][0], config["input_features"][STATE]["shape"][0]
    if action_dim > state_dim:
        raise CheckpointError(
            f"{directory}: relative actions add the state's dim i to action dim i, but the actions have "
            f"{action_dim} dims and the state {state_dim}"
        )
    step = relative[1]["config"]
    names = step.get("action_names")
    if names is not None and len(names) != action_dim:
        raise CheckpointError(
            f"{directory}: {RELATIVE} names {len(names)} actions ({names}) but the actions have {action_dim} dims"
        )
    excluded = [str(joint).lower() for joint in step.get("exclude_joints") or [] if joint]
    if names is None or not excluded:
        return (True,) * action_dim
    return tuple(not any(joint in str(name).lower() for joint in excluded) for name in names)


@dataclass(frozen=True)
class LeRobotVersion:
    """One LeRobot version's checkpoints: its `--format` name, its conventions set, whether it saves the
    relative action steps, and whether it is the one after 0.4 (told by `saved_after_04`)."""

    format: str
    conventions: Conventions
    relative_actions: bool
    after_04: bool

    def detect(self, directory: Path) -> bool:
        config = directory / "config.json"
        if not (config.is_file() and (directory / PREPROCESSOR).is_file()):
            return False
        loaded = json.loads(config.read_text())
        return "type" in loaded and (saved_after_04(directory, loaded) is not None) == self.after_04

    def _check_version(self, directory: Path, config: dict[str, Any]) -> None:
        if not (directory / PREPROCESSOR).is_file():
            raise CheckpointError(
                f"{directory} is a LeRobot v0.3 checkpoint (statistics inside model.safetensors, no {PREPROCESSOR}): "
                "read it as lerobot-0.3 (--format lerobot-0.3, or let the format be detected)"
            )
        why = saved_after_04(directory, config)
        if self.after_04 and why is None:
            raise CheckpointError(
                f"{directory} is a LeRobot 0.4 checkpoint (no relative action steps, no use_relative_actions, only "
                "the tied lm_head): read it as lerobot-0.4 (--format lerobot-0.4, or let the format be detected)"
            )
        if not self.after_04 and why is not None:
            raise CheckpointError(
                f"{directory} is a LeRobot >= 0.5 checkpoint ({why}): read it as lerobot-0.6 "
                "(--format lerobot-0.6, or let the format be detected)"
            )

    def load(self, directory: Path, dtype: torch.dtype = torch.float32) -> LoadedPolicy:
        config = json.loads((directory / "config.json").read_text())
        kind = config.get("type")
        if kind not in TYPES:
            raise CheckpointError(f"{directory}/config.json is a LeRobot {kind!r} policy, not pi0 or pi05")
        self._check_version(directory, config)
        known = {
            PREPROCESSOR: _pre_steps(self.conventions, self.relative_actions),
            POSTPROCESSOR: _post_steps(self.relative_actions),
        }
        pipeline = Pipeline.read(directory, known)
        normalizer = pipeline.find(pipeline.pre, "normalizer_processor")
        unnormalizer = pipeline.find(pipeline.post, "unnormalizer_processor")
        tokenizer = pipeline.find(pipeline.pre, "tokenizer_processor")
        state_prompt = pipeline.find(pipeline.pre, "pi05_prepare_state_tokenizer_processor_step")
        new_line = pipeline.find(pipeline.pre, "pi0_new_line_processor")
        if tokenizer is None or normalizer is None or unnormalizer is None:
            raise CheckpointError(
                f"{directory}: a pi0 pipeline needs a tokenizer, a normalizer and an unnormalizer step"
            )
        pi05 = TYPES[kind]
        if pi05 != (state_prompt is not None) or (
            state_prompt is not None and not normalizer[0] < state_prompt[0] < tokenizer[0]
        ):
            raise CheckpointError(
                f"{directory}: a {kind} pipeline this exporter reproduces writes the normalized state into the "
                "prompt (normalizer, then pi05_prepare_state_tokenizer_processor_step, then tokenizer) for pi05 only"
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
            raise CheckpointError(
                f"rename_observations_processor renames {unsupported}: only camera renames are supported"
            )
        sent_as = {target: source for source, target in rename_map.items()}  # the robot sends the source names
        mask = relative_mask(directory, pipeline, config, normalizer[0], unnormalizer[0])

        weights, names, extras = read_weights(directory / "model.safetensors")
        if extras:
            raise CheckpointError(
                f"{directory}: unexpected tensor {next(iter(extras))} (statistics live in the pipelines)"
            )
        model = build_model(weights, names, dtype)
        if model.dims.pi05 != pi05:
            raise CheckpointError(f"config.json says {kind}, the weights are {model.dims.model_type}")
        budget = int(tokenizer[1]["config"].get("max_length", config.get("tokenizer_max_length", 48)))
        height, width = config.get("image_resolution", (224, 224))
        eps = self.conventions.norm_eps
        spec = PolicySpec(
            conventions=self.conventions.name,
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
            state_norm=_stats(directory, normalizer[1], STATE, "STATE", eps),
            action_norm=_stats(directory, unnormalizer[1], ACTION, "ACTION", eps),
            state_in_prompt=pi05,
            delta_action_mask=mask,
            delta_reference="raw_state" if mask is not None else "adapted_state",
        )
        check_spec_fits(spec, model)
        details = {"pipeline": pipeline.describe(), "tokenizer_name": tokenizer[1]["config"].get("tokenizer_name")}
        if self.relative_actions:
            details["relative_actions"] = {
                "relative_dims": list(spec.delta_dims),
                "absolute_dims": [i for i in range(spec.action_dim) if i not in spec.delta_dims],
                "relative_to": "the raw state as the robot sends it" if mask is not None else None,
            }
        return LoadedPolicy(model=model, spec=spec, source=SOURCE, details=details)

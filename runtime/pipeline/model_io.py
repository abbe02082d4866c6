"""Observation -> network inputs, and network output -> actions, as the `PolicySpec` says.

Both the daemon's engine and the exporter's PyTorch reference call these functions; the only thing
between them is the network (VLM once, action expert `num_steps` times).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from runtime.bundle.spec import PolicySpec
from runtime.pipeline import transforms


@dataclass(frozen=True)
class ModelInputs:
    """A batch of one, shaped and typed as the network takes it (guidance's two prompts: tokens of two rows)."""

    images: np.ndarray  # [1, slots, 3, H, W] float32 in [-1, 1]
    image_masks: np.ndarray  # [1, slots] bool; false for empty camera slots
    tokens: np.ndarray  # [1, L] int64 ([2, L]: the unconditioned prompt, then the conditioned one)
    token_mask: np.ndarray  # [1, L] bool (or [2, L])
    state: np.ndarray  # [1, max_state_dim] float32, normalized and zero-padded


def adapted_state(spec: PolicySpec, state: np.ndarray) -> np.ndarray:
    """The robot's raw state as the robot's input adapter leaves it (ALOHA's decoded joints and grippers),
    before normalization: what openpi's delta actions are relative to."""
    state = np.asarray(state, dtype=np.float32).reshape(-1)
    if spec.adapt_to_pi_aloha:
        state = transforms.aloha_decode_state(state, spec.convention_set)
    return state


def model_state(spec: PolicySpec, state: np.ndarray) -> np.ndarray:
    """The robot's raw state -> the state as the model reads it (robot conventions, normalized), unpadded.
    pi0 takes it padded as the `state` input; pi0.5 as prompt tokens (`transforms.discretize_state`)."""
    state = adapted_state(spec, state)
    if spec.state_norm is not None:
        state = transforms.normalize(state, spec.state_norm)
    return state


def prompt_state(spec: PolicySpec, state: np.ndarray) -> np.ndarray:
    """The model state as pi0.5's prompt writes it: the robot's dims (openpi), or padded with zeros to
    max_state_dim (LeRobot >= 0.4, whose padding reads as bin 128)."""
    if spec.convention_set.prompt_state == "padded":
        return transforms.pad_vector(np.asarray(state, dtype=np.float32), spec.max_state_dim)
    return state


def preprocess(
    spec: PolicySpec,
    images: Mapping[str, np.ndarray],
    state: np.ndarray,
    tokens: np.ndarray,
    token_mask: np.ndarray,
) -> ModelInputs:
    """One observation as the engine validated it (camera frames by key, any of `optional_cameras` may be
    absent; the `model_state`; the tokenized prompt) -> `ModelInputs`. ValueError for an image the
    resize cannot fit."""
    conventions = spec.convention_set
    empty = transforms.empty_camera_image(spec.image_size)
    frames = []
    for key in spec.camera_keys:
        try:
            frames.append(
                transforms.prepare_image(images[key], spec.image_size, conventions) if key in images else empty
            )
        except ValueError as e:
            raise ValueError(f"camera {key}: {e}") from e
    frames += [empty] * spec.empty_cameras
    masks = [key in images for key in spec.camera_keys] + [False] * spec.empty_cameras
    return ModelInputs(
        images=np.stack(frames)[None],
        image_masks=np.array([masks]),
        tokens=np.atleast_2d(np.asarray(tokens, dtype=np.int64)),
        token_mask=np.atleast_2d(np.asarray(token_mask, dtype=bool)),
        state=transforms.pad_vector(np.asarray(state, dtype=np.float32), spec.max_state_dim)[None],
    )


def delta_offset(spec: PolicySpec, raw_state: np.ndarray | None) -> np.ndarray | None:
    """What delta actions are relative to, per action dim (0 on absolute dims), from the robot's raw state:
    the state `spec.delta_reference` names (openpi: after the robot's input adapter, before normalization;
    LeRobot 0.6: as sent). None for a policy with absolute actions."""
    if spec.delta_action_mask is None:
        return None
    if raw_state is None:
        raise ValueError("this policy's actions are relative to the state: postprocessing needs the state")
    state = np.asarray(raw_state, dtype=np.float32).reshape(-1)
    if spec.delta_reference == "adapted_state":
        state = adapted_state(spec, state)
    n = len(spec.delta_action_mask)  # the spec holds it to no more than the state's and the actions' dims
    offset = np.zeros(spec.action_dim, dtype=np.float32)
    offset[:n] = np.where(spec.delta_action_mask, state[:n], np.float32(0.0))
    return offset


def postprocess(spec: PolicySpec, x: np.ndarray, raw_state: np.ndarray | None = None) -> np.ndarray:
    """The sampler's final x ([1, chunk, max_action_dim], normalized) -> robot actions [1, chunk, action_dim].
    A policy with delta actions needs the robot's raw state of the request: they are made absolute after
    de-normalization and before the robot's output adapter (openpi's AbsoluteActions before AlohaOutputs;
    LeRobot 0.6's AbsoluteActionsProcessorStep after its unnormalizer)."""
    actions = np.asarray(x, dtype=np.float32)[..., : spec.action_dim]
    if spec.action_norm is not None:
        actions = transforms.unnormalize(actions, spec.action_norm)
    offset = delta_offset(spec, raw_state)
    if offset is not None:
        actions = actions + offset
    if spec.adapt_to_pi_aloha:
        actions = transforms.aloha_encode_actions(actions, spec.convention_set)
    return actions


def actions_to_model(spec: PolicySpec, actions: np.ndarray, raw_state: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `postprocess`: robot actions [n, action_dim] -> the model's space [n, max_action_dim]
    (zero-padded), e.g. the previous chunk's actions that real-time chunking holds the new one to (relative
    to this request's state, as the new chunk will be)."""
    x = np.asarray(actions, dtype=np.float32)
    if spec.adapt_to_pi_aloha:
        x = transforms.aloha_encode_actions_inv(x, spec.convention_set)
    offset = delta_offset(spec, raw_state)
    if offset is not None:
        x = x - offset
    if spec.action_norm is not None:
        x = transforms.unnormalize_inv(x, spec.action_norm)
    return transforms.pad_vector(x, spec.max_action_dim)


def initial_noise(spec: PolicySpec, rng: np.random.Generator) -> np.ndarray:
    """x at t = 1: standard Gaussian [1, chunk, max_action_dim] (never zeros), from the caller's generator."""
    return rng.standard_normal((1, spec.chunk_size, spec.max_action_dim), dtype=np.float32)

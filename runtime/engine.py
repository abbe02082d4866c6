"""The engine: one observation in, one action chunk out, with numpy around a backend.

preprocess (runtime.pipeline.model_io) -> VLM once -> expert num_steps times with the Euler update ->
postprocess. With classifier-free guidance (runtime.bundle.guidance) and a scale other than 1, each step is
both branches in one expert call, over the prompt's two prefixes (one VLM call) or one with a learned condition. The prefix cache stays inside the backend (device memory on an accelerator) for all
steps. The observation is validated here, once, so that every refusal names what was expected.

The daemon's engine runs a bundle's graphs; the exporter's reference is the same engine over the
PyTorch model (`exporter.torch_backend`), so the two differ only in the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pi0_client.metadata import Camera, Metadata, PromptInfo
from runtime.backends import Backend
from runtime.bundle.conventions import PromptStyle
from runtime.bundle.graphs import VLM, VLM_GUIDED
from runtime.bundle.guidance import PROMPT_CONDITION, Guidance
from runtime.bundle.manifest import Bundle
from runtime.bundle.robot import Robot
from runtime.bundle.spec import PolicySpec
from runtime.errors import ApplianceError, ConfigError
from runtime.pipeline import transforms
from runtime.pipeline.letterbox import undo_letterbox
from runtime.pipeline.model_io import (
    ModelInputs,
    actions_to_model,
    initial_noise,
    model_state,
    postprocess,
    preprocess,
    prompt_state,
)
from runtime.pipeline.observation import ARRAY_FIELDS, Observation
from runtime.pipeline.rtc import Inpainting, inpainting
from runtime.pipeline.tokenizer import PromptTokenizer, StatePromptTable, padded
from runtime.pipeline.transforms import euler_times

MAX_IMAGE_SIDE = 4096


class EngineError(ApplianceError):
    """A request the engine refuses (`bad_request`) or whose result it withholds (`bad_output`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def denoise(
    backend: Backend,
    cache: Any,
    state: np.ndarray,
    noise: np.ndarray,
    num_steps: int,
    trace: dict | None = None,
    inpaint: Callable[[np.ndarray, float], np.ndarray] | None = None,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """The Euler loop: x(t=1) = noise -> x(t=0), dt = -1/num_steps, the prefix cache left in the backend.
    `trace`, when given, receives every step's x_t and v_t (for alignment work). `inpaint(x, t)`, when
    given, adjusts x after each step (real-time chunking's inpainting: runtime.pipeline.rtc), on the guided
    velocity where `guidance_scale` is given (each step both branches, combined)."""
    dt = np.float32(-1.0 / num_steps)
    x = np.asarray(noise, dtype=np.float32)
    for i, t in enumerate(euler_times(num_steps)):
        v = backend.velocity(cache, state, x, np.array([t], dtype=np.float32), guidance_scale)
        if trace is not None:
            trace[f"step{i:02d}.t"], trace[f"step{i:02d}.x_t"], trace[f"step{i:02d}.v_t"] = np.float32(t), x, v
        x = x + dt * v
        if inpaint is not None:
            x = inpaint(x, max(0.0, float(t + dt)))
    return x


def sample(backend: Backend, inputs: ModelInputs, noise: np.ndarray, num_steps: int) -> np.ndarray:
    """Network inputs and x(t=1) -> normalized, padded actions [1, chunk, max_action_dim]."""
    cache = backend.prefix(inputs)
    try:
        return denoise(backend, cache, inputs.state, noise, num_steps)
    finally:
        cache.release()


class Prompts:
    """A policy's prompt handling: its fixed prompts (tokenized at export), else its tokenizer, or
    tokens given directly. The engine's, and so the daemon's and the reference's alike. With
    `state_in_prompt` (pi0.5) the prompt's tokens depend on the state: fixed prompts then carry a
    `StatePromptTable`, and the tokenizer formats the state's bins into the text. `default` is the prompt
    of a request that gives neither text nor tokens (openpi's InjectDefaultPrompt)."""

    def __init__(
        self,
        length: int,
        vocab_size: int,
        style: PromptStyle,
        fixed: dict[str, tuple[list[int], list[bool]] | StatePromptTable] | None = None,
        tokenizer: Path | None = None,
        state_in_prompt: bool = False,
        default: str | None = None,
    ) -> None:
        self.length = length
        self.default = default
        self.vocab_size = vocab_size
        self.style = style
        self.state_in_prompt = state_in_prompt
        self.fixed = {
            text: value if isinstance(value, StatePromptTable) else _as_arrays(*value)
            for text, value in (fixed or {}).items()
        }
        self.tokenizer_path = tokenizer
        self._tokenizer: PromptTokenizer | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Prompts:
        section, spec = bundle.manifest.prompt, bundle.spec
        fixed: dict = {
            p.text: StatePromptTable.from_dict(p.state_table) if p.state_table is not None else (p.tokens, p.mask)
            for p in section.fixed
        }
        return cls(
            spec.tokenizer_max_length,
            bundle.manifest.vocab_size,
            spec.convention_set.prompt,
            fixed,
            bundle.tokenizer,
            spec.state_in_prompt,
            section.default,
        )

    def __call__(
        self,
        prompt: str | None,
        tokens: np.ndarray | None = None,
        token_mask: np.ndarray | None = None,
        state: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (tokens [1, L] int64, mask [1, L] bool), or EngineError('bad_request', what is accepted).
        `state` is the model's (normalized) state as the prompt writes it; with `state_in_prompt` it goes into
        the prompt."""
        length = self.length
        if tokens is not None:
            tokens = np.asarray(tokens).reshape(1, -1)
            mask = np.ones_like(tokens, dtype=bool) if token_mask is None else np.asarray(token_mask).reshape(1, -1)
            if tokens.shape != (1, length) or mask.shape != (1, length) or not np.issubdtype(tokens.dtype, np.integer):
                raise EngineError("bad_request", f"tokens and token_mask must be {length} integers and {length} bools")
            if tokens.min() < 0 or tokens.max() >= self.vocab_size:
                raise EngineError("bad_request", "token ids outside the model's vocabulary")
            return tokens.astype(np.int64), mask.astype(bool)
        prompt = self.default if prompt is None else prompt
        if prompt is None:
            raise EngineError("bad_request", "give a prompt (text) or tokens (this policy has no default prompt)")
        bins = transforms.discretize_state(state) if self.state_in_prompt and state is not None else None
        if self.state_in_prompt and bins is None:
            raise EngineError("bad_request", "this policy's prompt carries the state: the state is needed")
        try:
            if prompt in self.fixed:
                fixed = self.fixed[prompt]
                return padded(fixed.encode(bins), length, prompt) if isinstance(fixed, StatePromptTable) else fixed
            if self.tokenizer_path is None:
                raise EngineError(
                    "bad_request", f"this policy has no tokenizer; its prompts are {sorted(self.fixed)} or tokens"
                )
            if self._tokenizer is None:
                self._tokenizer = PromptTokenizer(self.tokenizer_path, length, self.style, self.state_in_prompt)
            return self._tokenizer(prompt, bins)
        except ValueError as e:
            raise EngineError("bad_request", str(e)) from e


def _as_arrays(tokens: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([tokens], dtype=np.int64), np.array([mask], dtype=bool)


class Engine:
    def __init__(
        self,
        spec: PolicySpec,
        backend: Backend,
        prompts: Prompts,
        *,
        precision: str,
        source: str,
        robot: Robot | None = None,
        guidance: Guidance | None = None,
    ) -> None:
        self.spec = spec
        self.guidance = guidance
        self.backend = backend
        self.prompts = prompts
        self.precision = precision
        self.source = source
        self.robot = robot
        # derived once: what every request's cameras are checked against
        self._camera_shapes = dict(zip(spec.camera_keys, spec.camera_shapes, strict=True))
        self._unused_cameras = frozenset(robot.unused_cameras) if robot is not None else frozenset()

    @classmethod
    def from_bundle(cls, bundle: Bundle, backend: Backend) -> Engine:
        manifest = bundle.manifest
        return cls(
            bundle.spec,
            backend,
            Prompts.from_bundle(bundle),
            precision=bundle.precision,
            source=manifest.source,
            robot=manifest.robot,
            guidance=manifest.guidance,
        )

    def with_num_steps(self, num_steps: int | None) -> Engine:
        """An engine on the same backend taking `num_steps` Euler steps per chunk instead of the spec's
        (None: this one). The graphs do not depend on it: the expert runs once per step."""
        if num_steps is None or num_steps == self.spec.num_steps:
            return self
        try:
            spec = replace(self.spec, num_steps=num_steps)  # the spec refuses num_steps < 1
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return Engine(
            spec,
            self.backend,
            self.prompts,
            precision=self.precision,
            source=self.source,
            robot=self.robot,
            guidance=self.guidance,
        )

    def close(self) -> None:
        self.backend.close()

    def device_memory(self) -> tuple[int, int] | None:
        """(used, total) bytes of the accelerator's memory, where the backend reports it."""
        return self.backend.device_memory()

    def metadata(self) -> Metadata:
        """What a client needs to know to build requests."""
        spec = self.spec
        return Metadata(
            cameras=tuple(
                Camera(k, s, optional=k in spec.optional_cameras)
                for k, s in zip(spec.camera_keys, spec.camera_shapes, strict=True)
            ),
            state_dim=spec.state_dim,
            action_dim=spec.action_dim,
            chunk_size=spec.chunk_size,
            num_steps=spec.num_steps,
            noise_shape=(1, spec.chunk_size, spec.max_action_dim),
            prompt=PromptInfo(
                max_tokens=spec.tokenizer_max_length,
                tokenizer=self.prompts.tokenizer_path is not None,
                fixed=tuple(self.prompts.fixed),
            ),
            precision=self.precision,
            backend=self.backend.name,
            source=self.source,
            conventions=spec.conventions,
            extra=self._robot_metadata(),
        )

    def _robot_metadata(self) -> dict[str, Any]:
        """Beside our fields: the training config's `policy_metadata` at the top level, as openpi's server
        sends it (its `examples/aloha_real` reads `reset_pose` there), the robot's training config, the
        default prompt and the delta action mask."""
        extra: dict[str, Any] = {}
        if self.robot is not None:
            extra.update(self.robot.policy_metadata)
            extra["robot"] = {
                "name": self.robot.name,
                "family": self.robot.family,
                "source": self.robot.source,
                "state_keys": list(self.robot.state_keys),
                "unused_cameras": list(self.robot.unused_cameras),
                "proof": self.robot.proof,
            }
        if self.prompts.default is not None:
            extra["default_prompt"] = self.prompts.default
        if self.spec.delta_action_mask is not None:
            extra["delta_action_mask"] = list(self.spec.delta_action_mask)
        if self.guidance is not None:  # a request's `guidance_scale` overrides the default
            extra["guidance"] = self.guidance.to_dict()
        return extra

    def warm_up_requests(self, seed: int = 0) -> list[Observation]:
        """Synthetic requests that between them run every graph this engine serves: the plain ones, and with
        guidance the guided ones (a condition in the prompt needs a text prompt it can tokenize)."""
        obs = Observation.synthetic(self.metadata(), seed)
        if self.guidance is None:
            return [obs]
        requests = [replace(obs, guidance_scale=1.0)]
        guided = 2.0 if self.guidance.default_scale == 1.0 else self.guidance.default_scale
        if self.guidance.kind != PROMPT_CONDITION:
            return [*requests, replace(obs, guidance_scale=guided)]
        fixed = self.prompts.fixed
        tasks = [t for t in fixed if self.guidance.conditioned(t) in fixed]
        task = self.prompts.default or next(iter(tasks), None)
        if task is None and self.prompts.tokenizer_path is not None:
            task = "warm up"
        if task is not None:
            requests.append(Observation(obs.images, obs.state, prompt=task, seed=seed, guidance_scale=guided))
        return requests

    def _guidance_scale(self, obs: Observation) -> float | None:
        """The request's beta where this chunk is guided (both branches per step); None where it is not: a
        policy without guidance, or beta = 1 (the conditioned branch alone)."""
        scale = obs.guidance_scale
        if self.guidance is None:
            if scale is not None and scale != 1.0:
                raise EngineError(
                    "bad_request",
                    "this policy was exported without classifier-free guidance: guidance_scale can only be 1",
                )
            return None
        scale = self.guidance.default_scale if scale is None else scale
        return None if scale == 1.0 else scale

    def _tokens(self, obs: Observation, state: np.ndarray, guided: bool) -> tuple[np.ndarray, np.ndarray]:
        """The prompt's tokens and mask [1, L]; with a condition in the prompt the conditioned prompt, and
        for a guided chunk [2, L]: the task alone, then the conditioned prompt."""
        pstate = prompt_state(self.spec, state)
        guidance = self.guidance
        if guidance is None or guidance.kind != PROMPT_CONDITION or obs.tokens is not None:
            if guided and guidance is not None and guidance.kind == PROMPT_CONDITION:
                raise EngineError(
                    "bad_request",
                    "guidance with a condition in the prompt needs the prompt as text (or guidance_scale 1 with tokens)",
                )
            return self.prompts(obs.prompt, obs.tokens, obs.token_mask, pstate)
        task = self.prompts.default if obs.prompt is None else obs.prompt
        if task is None:
            raise EngineError("bad_request", "give a prompt (text) or tokens (this policy has no default prompt)")
        tokens, mask = self.prompts(guidance.conditioned(task), None, None, pstate)
        if not guided:
            return tokens, mask
        plain_tokens, plain_mask = self.prompts(task, None, None, pstate)
        return np.concatenate([plain_tokens, tokens]), np.concatenate([plain_mask, mask])

    def _images(self, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cameras, checked against the policy's and stripped of a leading batch of 1; those the robot's
        inputs accept without a model slot for them (ALOHA's cam_low) are dropped."""
        keys = list(self.spec.camera_keys)
        images = {
            key: image for key, image in images.items() if key not in self._unused_cameras
        }  # as openpi's inputs do
        missing, extra = set(keys) - set(images) - set(self.spec.optional_cameras), set(images) - set(keys)
        if extra:
            raise EngineError(
                "bad_request",
                f"unexpected arrays {sorted(extra)}: this policy's cameras are {keys}, its other arrays {list(ARRAY_FIELDS)}",
            )
        if missing:
            raise EngineError("bad_request", f"missing camera(s) {sorted(missing)}; this policy's cameras are {keys}")
        checked = {}
        for key, image in images.items():
            image = np.asarray(image)
            image = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
            ok_layout = image.ndim == 3 and (image.shape[0] == 3 or image.shape[-1] == 3)
            if image.dtype != np.uint8 or not ok_layout or max(image.shape) > MAX_IMAGE_SIDE or min(image.shape) < 1:
                raise EngineError(
                    "bad_request",
                    f"camera {key}: expected uint8 HxWx3 or 3xHxW (sides up to {MAX_IMAGE_SIDE}), "
                    f"got {image.dtype} {list(np.shape(images[key]))}",
                )
            checked[key] = image
        return checked

    def _frames(self, images: dict[str, np.ndarray], notes: dict[str, str] | None) -> dict[str, np.ndarray]:
        """Each frame whose aspect ratio is not its camera's: a client-side letterbox undone, or flagged."""
        frames = {}
        for key, image in images.items():
            frames[key], note = undo_letterbox(image, self._camera_shapes[key])
            if note is not None and notes is not None:
                notes[key] = note
        return frames

    def _state(self, state: np.ndarray) -> np.ndarray:
        state = np.asarray(state)
        if state.size != self.spec.state_dim or not np.issubdtype(state.dtype, np.floating):
            raise EngineError(
                "bad_request", f"state must be {self.spec.state_dim} floats, got {state.dtype} {list(state.shape)}"
            )
        if not np.isfinite(state).all():
            raise EngineError("bad_request", "state contains NaN or inf")
        return state.reshape(-1)

    def _noise(self, obs: Observation) -> np.ndarray:
        shape = (1, self.spec.chunk_size, self.spec.max_action_dim)
        if obs.noise is None:
            return initial_noise(self.spec, np.random.default_rng(obs.seed))
        noise = np.asarray(obs.noise)
        if noise.size != np.prod(shape) or not np.issubdtype(noise.dtype, np.number) or not np.isfinite(noise).all():
            raise EngineError("bad_request", f"noise must be {list(shape)} finite floats")
        return noise.astype(np.float32).reshape(shape)

    def _inpainting(
        self, obs: Observation, raw_state: np.ndarray, noise: np.ndarray
    ) -> tuple[Inpainting | None, np.ndarray | None]:
        """Real-time chunking's inpainting for a request that carries the previous chunk's actions."""
        if obs.prev_actions is None:
            return None, None
        prev = np.asarray(obs.prev_actions)
        spec = self.spec
        if (
            prev.ndim != 2
            or prev.shape[1] != spec.action_dim
            or not 1 <= prev.shape[0] <= spec.chunk_size
            or not np.issubdtype(prev.dtype, np.floating)
            or not np.isfinite(prev).all()
        ):
            raise EngineError(
                "bad_request",
                f"prev_actions must be [n, {spec.action_dim}] finite floats with 1 <= n <= {spec.chunk_size}, "
                f"got {prev.dtype} {list(prev.shape)}",
            )
        if obs.delay > prev.shape[0]:
            raise EngineError("bad_request", f"delay {obs.delay} exceeds the {prev.shape[0]} prev_actions given")
        prev = prev.astype(np.float32)
        return inpainting(actions_to_model(spec, prev, raw_state), obs.delay, spec.chunk_size, noise), prev

    def infer(
        self, obs: Observation, trace: dict[str, np.ndarray] | None = None, notes: dict[str, str] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """-> actions [chunk, action_dim] in the robot's units, and a timing breakdown in ms.
        `trace`, when given, receives every stage's tensors (network inputs, noise, each step, output);
        `notes`, per camera, what was done to a frame whose aspect ratio is not its camera's."""
        start = time.perf_counter()
        raw_state = self._state(obs.state)
        images, state = self._frames(self._images(obs.images), notes), model_state(self.spec, raw_state)
        scale = self._guidance_scale(obs)
        tokens, token_mask = self._tokens(obs, state, scale is not None)
        noise = self._noise(obs)
        inpaint, prev = self._inpainting(obs, raw_state, noise)
        try:
            inputs = preprocess(self.spec, images, state, tokens, token_mask)
        except ValueError as e:  # an image the resize cannot fit (too thin)
            raise EngineError("bad_request", str(e)) from e
        t_pre = time.perf_counter()

        cache = self.backend.prefix(inputs, VLM_GUIDED if len(tokens) == 2 else VLM)
        t_vlm = time.perf_counter()
        try:
            x = denoise(self.backend, cache, inputs.state, noise, self.spec.num_steps, trace, inpaint, scale)
        finally:
            cache.release()
        t_expert = time.perf_counter()

        actions = postprocess(self.spec, x, raw_state)[0]
        if prev is not None:  # executed while this chunk was computed: exactly the previous chunk's
            actions[: obs.delay] = prev[: obs.delay]
        if trace is not None:
            trace.update({f"input.{k}": v for k, v in vars(inputs).items()})
            trace.update({"noise": noise, "x_final": x, "actions": actions})
        if not np.isfinite(actions).all():
            raise EngineError("bad_output", "the model produced non-finite actions; nothing is sent to the robot")
        end = time.perf_counter()
        ms = 1e3
        return actions, {
            "preprocess_ms": (t_pre - start) * ms,
            "vlm_ms": (t_vlm - t_pre) * ms,
            "expert_ms": (t_expert - t_vlm) * ms,
            "expert_step_ms": (t_expert - t_vlm) * ms / self.spec.num_steps,
            "postprocess_ms": (end - t_expert) * ms,
            "total_ms": (end - start) * ms,
        }

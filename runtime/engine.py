"""The engine: one observation in, one action chunk out, with numpy around a backend.

preprocess (runtime.pipeline) -> VLM once -> expert num_steps times with the Euler update ->
postprocess. The prefix cache stays inside the backend (device memory on an accelerator) for all
steps. Inputs are validated here, so that every refusal names what was expected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from runtime import transforms
from runtime.bundle import Bundle
from runtime.pipeline import ModelInputs, initial_noise, postprocess, preprocess
from runtime.transforms import euler_times

MAX_IMAGE_SIDE = 4096


class Backend(Protocol):
    name: str

    def prefix(self, inputs: ModelInputs) -> Any: ...

    def velocity(self, cache: Any, state: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class EngineError(Exception):
    """A request the engine refuses (`bad_request`) or whose result it withholds (`bad_output`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def denoise(
    backend: Backend, cache: Any, state: np.ndarray, noise: np.ndarray, num_steps: int, trace: dict | None = None
) -> np.ndarray:
    """The Euler loop: x(t=1) = noise -> x(t=0), dt = -1/num_steps, the prefix cache left in the backend.
    `trace`, when given, receives every step's x_t and v_t (for alignment work)."""
    dt = np.float32(-1.0 / num_steps)
    x = np.asarray(noise, dtype=np.float32)
    for i, t in enumerate(euler_times(num_steps)):
        v = backend.velocity(cache, state, x, np.array([t], dtype=np.float32))
        if trace is not None:
            trace[f"step{i:02d}.t"], trace[f"step{i:02d}.x_t"], trace[f"step{i:02d}.v_t"] = np.float32(t), x, v
        x = x + dt * v
    return x


def sample(backend: Backend, inputs: ModelInputs, noise: np.ndarray, num_steps: int) -> np.ndarray:
    """Network inputs and x(t=1) -> normalized, padded actions [1, chunk, max_action_dim]."""
    return denoise(backend, backend.prefix(inputs), inputs.state, noise, num_steps)


class BundlePrompts:
    """A bundle's prompt handling: its fixed prompts (tokenized at export), else its tokenizer, or
    tokens given directly. Shared by the engine and by whatever must tokenize exactly as it does."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.length = bundle.spec.tokenizer_max_length
        self.fixed = {
            p["text"]: (np.array([p["tokens"]], dtype=np.int64), np.array([p["mask"]], dtype=bool))
            for p in bundle.manifest["prompt"]["fixed"]
        }
        self._tokenizer = None

    def __call__(
        self, prompt: str | None, tokens: np.ndarray | None = None, token_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (tokens [1, L] int64, mask [1, L] bool), or EngineError('bad_request', what is accepted)."""
        length = self.length
        if tokens is not None:
            tokens = np.asarray(tokens).reshape(1, -1)
            mask = np.ones_like(tokens, dtype=bool) if token_mask is None else np.asarray(token_mask).reshape(1, -1)
            if tokens.shape != (1, length) or mask.shape != (1, length) or not np.issubdtype(tokens.dtype, np.integer):
                raise EngineError("bad_request", f"tokens and token_mask must be {length} integers and {length} bools")
            if tokens.min() < 0 or tokens.max() >= self.bundle.manifest["model"]["vocab_size"]:
                raise EngineError("bad_request", "token ids outside the model's vocabulary")
            return tokens.astype(np.int64), mask.astype(bool)
        if prompt is None:
            raise EngineError("bad_request", "give a prompt (text) or tokens")
        if prompt in self.fixed:
            return self.fixed[prompt]
        if self.bundle.tokenizer is None:
            raise EngineError(
                "bad_request", f"this bundle has no tokenizer; its prompts are {sorted(self.fixed)} or tokens"
            )
        if self._tokenizer is None:
            from runtime.tokenizer import PromptTokenizer

            self._tokenizer = PromptTokenizer(self.bundle.tokenizer, length, self.bundle.spec.prompt_style)
        try:
            return self._tokenizer(prompt)
        except ValueError as e:
            raise EngineError("bad_request", str(e)) from e


class Engine:
    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.backend = backend
        self.prompts = BundlePrompts(bundle)

    def close(self) -> None:
        self.backend.close()

    def metadata(self) -> dict[str, Any]:
        """What a client needs to know to build requests."""
        spec, prompt = self.spec, self.bundle.manifest["prompt"]
        return {
            "cameras": [
                {"key": k, "shape": list(s)} for k, s in zip(spec.camera_keys, spec.camera_shapes, strict=True)
            ],
            "image_layouts": ["HxWx3", "3xHxW"],
            "image_dtype": "uint8",
            "state_dim": spec.state_dim,
            "action_dim": spec.action_dim,
            "chunk_size": spec.chunk_size,
            "num_steps": spec.num_steps,
            "noise_shape": [1, spec.chunk_size, spec.max_action_dim],
            "prompt": {
                "max_tokens": spec.tokenizer_max_length,
                "tokenizer": prompt["tokenizer"] is not None,
                "fixed": [p["text"] for p in prompt["fixed"]],
            },
            "precision": self.bundle.precision,
            "backend": self.backend.name,
            "source": self.bundle.manifest["source"],
        }

    def check_images(self, images: Mapping[str, np.ndarray]) -> None:
        expected = set(self.spec.camera_keys)
        missing, extra = expected - set(images), set(images) - expected
        if missing or extra:
            raise EngineError(
                "bad_request",
                f"cameras {sorted(images)} do not match this policy's {list(self.spec.camera_keys)} "
                f"(missing {sorted(missing)}, unexpected {sorted(extra)})",
            )
        for key, image in images.items():
            shape = image.shape[1:] if image.ndim == 4 and image.shape[0] == 1 else image.shape
            ok_layout = len(shape) == 3 and (shape[0] == 3 or shape[-1] == 3)
            if image.dtype != np.uint8 or not ok_layout or max(shape) > MAX_IMAGE_SIDE or min(shape) < 1:
                raise EngineError(
                    "bad_request",
                    f"camera {key}: expected uint8 HxWx3 or 3xHxW (sides up to {MAX_IMAGE_SIDE}), "
                    f"got {image.dtype} {list(image.shape)}",
                )
            _, height, width = transforms.to_chw(image.reshape(shape)).shape
            try:
                transforms.fitted_size(height, width, *self.spec.image_size)
            except ValueError as e:
                raise EngineError("bad_request", f"camera {key}: {e}") from e

    def infer(
        self,
        images: Mapping[str, np.ndarray],
        state: np.ndarray,
        *,
        prompt: str | None = None,
        tokens: np.ndarray | None = None,
        token_mask: np.ndarray | None = None,
        noise: np.ndarray | None = None,
        seed: int | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """-> actions [chunk, action_dim] in the robot's units, and a timing breakdown in ms.
        `trace`, when given, receives every stage's tensors (network inputs, noise, each step, output)."""
        start = time.perf_counter()
        self.check_images(images)
        images = {k: v[0] if v.ndim == 4 else v for k, v in images.items()}
        state = np.asarray(state)
        if state.size != self.spec.state_dim or not np.issubdtype(state.dtype, np.floating):
            raise EngineError(
                "bad_request", f"state must be {self.spec.state_dim} floats, got {state.dtype} {list(state.shape)}"
            )
        if not np.isfinite(state).all():
            raise EngineError("bad_request", "state contains NaN or inf")
        tokens, token_mask = self.prompts(prompt, tokens, token_mask)
        shape = (1, self.spec.chunk_size, self.spec.max_action_dim)
        if noise is None:
            noise = initial_noise(self.spec, np.random.default_rng(seed))
        elif np.asarray(noise).size != np.prod(shape) or not np.isfinite(noise).all():
            raise EngineError("bad_request", f"noise must be {list(shape)} finite floats")
        noise = np.asarray(noise, dtype=np.float32).reshape(shape)
        inputs = preprocess(self.spec, images, state, tokens, token_mask)
        t_pre = time.perf_counter()

        cache = self.backend.prefix(inputs)
        t_vlm = time.perf_counter()
        x = denoise(self.backend, cache, inputs.state, noise, self.spec.num_steps, trace)
        t_expert = time.perf_counter()

        actions = postprocess(self.spec, x)[0]
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

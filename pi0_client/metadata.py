"""What a policy server says about itself (the `metadata` reply), as one typed value.

The daemon's engine and the sim's scripted oracle both build a `Metadata`; the client reads one back.
Fields a server cannot state (the oracle has no flow steps, noise or precision) are None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGE_LAYOUTS = ("HxWx3", "3xHxW")


@dataclass(frozen=True)
class Camera:
    key: str
    shape: tuple[int, int, int]  # the trained size, CHW; any size is accepted and resized
    optional: bool = False  # may be left out (the model then sees an empty slot)


@dataclass(frozen=True)
class PromptInfo:
    max_tokens: int | None  # the token budget, None when prompts are not read
    tokenizer: bool  # whether any text is tokenized on the server
    fixed: tuple[str, ...] = ()  # prompts served without a tokenizer


@dataclass(frozen=True)
class Metadata:
    cameras: tuple[Camera, ...]
    state_dim: int
    action_dim: int
    chunk_size: int
    prompt: PromptInfo
    backend: str
    source: str
    num_steps: int | None = None
    noise_shape: tuple[int, ...] | None = None
    precision: str | None = None
    conventions: str | None = None  # the framework's conventions the policy follows (e.g. "openpi")
    image_layouts: tuple[str, ...] = IMAGE_LAYOUTS
    image_dtype: str = "uint8"
    # The server's intake limits (docs/protocol.md): a frame over max_frame_bytes gets the connection
    # dropped without a reply; a request over max_request_bytes gets `bad_request`.
    max_frame_bytes: int | None = None
    max_request_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what a newer server adds, kept as it came

    @property
    def camera_keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.cameras)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "cameras": [{"key": c.key, "shape": list(c.shape), "optional": c.optional} for c in self.cameras],
            "image_layouts": list(self.image_layouts),
            "image_dtype": self.image_dtype,
            "state_dim": self.state_dim,
            "action_dim": self.action_dim,
            "chunk_size": self.chunk_size,
            "num_steps": self.num_steps,
            "noise_shape": None if self.noise_shape is None else list(self.noise_shape),
            "prompt": {
                "max_tokens": self.prompt.max_tokens,
                "tokenizer": self.prompt.tokenizer,
                "fixed": list(self.prompt.fixed),
            },
            "precision": self.precision,
            "conventions": self.conventions,
            "backend": self.backend,
            "source": self.source,
            "max_frame_bytes": self.max_frame_bytes,
            "max_request_bytes": self.max_request_bytes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metadata:
        known = {
            "cameras", "image_layouts", "image_dtype", "state_dim", "action_dim", "chunk_size", "num_steps",
            "noise_shape", "prompt", "precision", "conventions", "backend", "source", "max_frame_bytes",
            "max_request_bytes",
        }  # fmt: skip
        prompt = d["prompt"]
        return cls(
            cameras=tuple(Camera(c["key"], tuple(c["shape"]), bool(c.get("optional", False))) for c in d["cameras"]),
            state_dim=d["state_dim"],
            action_dim=d["action_dim"],
            chunk_size=d["chunk_size"],
            prompt=PromptInfo(prompt["max_tokens"], prompt["tokenizer"], tuple(prompt.get("fixed", ()))),
            backend=d["backend"],
            source=d["source"],
            num_steps=d.get("num_steps"),
            noise_shape=None if d.get("noise_shape") is None else tuple(d["noise_shape"]),
            precision=d.get("precision"),
            conventions=d.get("conventions"),
            image_layouts=tuple(d.get("image_layouts", IMAGE_LAYOUTS)),
            image_dtype=d.get("image_dtype", "uint8"),
            max_frame_bytes=d.get("max_frame_bytes"),
            max_request_bytes=d.get("max_request_bytes"),
            extra={k: v for k, v in d.items() if k not in known},
        )

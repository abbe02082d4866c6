"""A model bundle: `manifest.json` plus the files it names, each with its sha256.

Loading needs nothing but the standard library and numpy. A bundle is refused, naming the file, when
the schema version is not ours, a named file is missing, altered, or would lie outside the bundle
directory (absolute paths, `..`, symlinks).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle.guidance import Guidance
from runtime.bundle.robot import Robot
from runtime.bundle.spec import PolicySpec
from runtime.errors import ApplianceError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ApplianceError):
    """A bundle we refuse to load, with the reason in words."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_inside(root: Path, name: str) -> Path:
    """`root / name`, refusing names that leave `root` or pass through a symlink."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise BundleError(f"{MANIFEST} names {name!r}, which is not a plain path inside the bundle")
    path = root / relative
    for part in [path, *path.parents]:
        if part == root:
            break
        if part.is_symlink():
            raise BundleError(f"{name} is (or passes through) a symlink; bundles hold plain files only")
    return path


@dataclass
class FixedPrompt:
    """A prompt tokenized at export, so that the robot serves it without a tokenizer: its tokens, or
    for a policy whose prompt holds the state (pi0.5) the table of `runtime.pipeline.tokenizer.StatePromptTable`."""

    text: str
    tokens: list[int] | None = None
    mask: list[bool] | None = None
    state_table: dict[str, Any] | None = None


@dataclass
class PromptSection:
    style: str
    max_length: int
    tokenizer: str | None  # the tokenizer's file in the bundle, or None: fixed prompts (or tokens) only
    fixed: list[FixedPrompt] = field(default_factory=list)
    default: str | None = None  # served when a request has neither prompt nor tokens


ONNX = "onnx"  # the artefact every bundle has: the graphs themselves (`GraphEntry.onnx`)
OM = "om"  # CANN's atc output for one Ascend SoC


@dataclass
class CompiledTarget:
    """The graphs compiled by one target's toolchain (`Manifest.compiled[kind]`): for "om", atc's files
    for the SoC named in `device`. `files` maps each graph to its file; it is empty where the toolchain
    did not run here, and `script` then holds the exact commands to run where it is installed."""

    device: str
    files: dict[str, str] = field(default_factory=dict)
    script: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.files)


@dataclass
class GraphEntry:
    onnx: str
    onnx_data: str | None
    inputs: list[dict[str, Any]]  # {"name", "shape", "dtype"} in the graph's order
    outputs: list[dict[str, Any]]


@dataclass
class Manifest:
    """`manifest.json`, typed: written by the exporter, read by the runtime."""

    source: str  # "lerobot", "openpi" or "preset:<name>"
    precision: str  # "fp32", "fp16" or "int8" (onnxruntime only: no OM, refused by the ACL backend)
    model: dict[str, Any]  # the network's dimensions (exporter.dims.Pi0Dims as a dict)
    policy: PolicySpec  # what the graphs take
    prompt: PromptSection
    graphs: dict[str, GraphEntry]
    compiled: dict[str, CompiledTarget] = field(default_factory=dict)  # artefact kind ("om") -> its files
    exporter: dict[str, Any] = field(default_factory=dict)  # version, torch, opset, created
    checkpoint: dict[str, Any] = field(default_factory=dict)  # what the reader found: asset id, pipeline, LoRA merged
    empty_cameras_dropped: int = 0  # the checkpoint's always-empty camera slots left out of the graphs
    checkpoint_token_budget: int | None = None  # the checkpoint's own, when the graphs take fewer
    validation: str | None = None  # the report's file
    files: dict[str, str] = field(default_factory=dict)  # every other file -> its sha256
    robot: Robot | None = None  # the training config's robot, where the checkpoint's reader knows it
    guidance: Guidance | None = None  # classifier-free guidance, where the bundle serves it (its graphs)
    schema_version: int = SCHEMA_VERSION

    @property
    def vocab_size(self) -> int:
        return int(self.model["vocab_size"])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        d["robot"] = None if self.robot is None else self.robot.to_dict()
        d["guidance"] = None if self.guidance is None else self.guidance.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = _upgrade_atc_section(dict(d))
        prompt = dict(d["prompt"])
        prompt["fixed"] = [FixedPrompt(**f) for f in prompt.get("fixed", [])]
        d["prompt"] = PromptSection(**prompt)
        d["compiled"] = {kind: CompiledTarget(**c) for kind, c in d.get("compiled", {}).items()}
        d["graphs"] = {name: GraphEntry(**g) for name, g in d["graphs"].items()}
        d["policy"] = PolicySpec.from_dict(d["policy"])
        d["robot"] = None if d.get("robot") is None else Robot.from_dict(d["robot"])
        d["guidance"] = None if d.get("guidance") is None else Guidance.from_dict(d["guidance"])
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"{MANIFEST} has fields this runtime does not know: {sorted(unknown)}")
        return cls(**d)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))


def _upgrade_atc_section(d: dict[str, Any]) -> dict[str, Any]:
    """Manifests written before `compiled` (exporter 0.1 up to Step 14) kept atc's output in an `atc`
    section ({soc_version, compiled, script}) and an `om` file per graph: read them as the "om" target."""
    if "atc" not in d:
        return d
    atc = d.pop("atc")
    graphs = {name: dict(g) for name, g in d["graphs"].items()}
    files = {name: om for name, g in graphs.items() if (om := g.pop("om", None)) is not None}
    d["graphs"] = graphs
    d["compiled"] = {OM: {"device": atc["soc_version"], "files": files, "script": atc.get("script")}}
    return d


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@dataclass(frozen=True)
class GraphFiles:
    onnx: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    graphs: dict[str, GraphFiles]

    @property
    def spec(self) -> PolicySpec:
        return self.manifest.policy

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def tensor_bytes(self) -> dict[str, int]:
        """Bytes of every graph input and output, by name (as the graphs declare them: static shapes)."""
        return {
            t["name"]: math.prod(t["shape"]) * np.dtype(t["dtype"]).itemsize
            for g in self.graphs.values()
            for t in g.inputs + g.outputs
        }

    @property
    def checkpoint_spec(self) -> PolicySpec:
        """The conventions of the checkpoint the bundle was exported from. `spec` is what the graphs
        take: they may leave out its always-empty camera slots and shorten its token budget (both only
        ever masked, so the actions are the same; docs/bundle.md)."""
        return replace(
            self.spec,
            empty_cameras=self.spec.empty_cameras + self.manifest.empty_cameras_dropped,
            tokenizer_max_length=self.manifest.checkpoint_token_budget or self.spec.tokenizer_max_length,
        )

    def artefact(self, kind: str) -> dict[str, Path] | None:
        """Each graph's file of the artefact `kind` ("onnx", or a `compiled` target such as "om"), or
        None where the bundle does not hold that artefact for every graph."""
        if kind == ONNX:
            return {name: graph.onnx for name, graph in self.graphs.items()}
        target = self.manifest.compiled.get(kind)
        if target is None or set(target.files) != set(self.graphs):
            return None
        return {name: resolve_inside(self.root, file) for name, file in target.files.items()}

    @property
    def tokenizer(self) -> Path | None:
        name = self.manifest.prompt.tokenizer
        return None if name is None else self.root / name


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and (by default) verify a bundle directory."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} not found")
    try:
        raw = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{manifest_path} is not valid JSON: {e}") from e
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path} has schema version {version!r}; this runtime reads {SCHEMA_VERSION}")
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{manifest_path} is not a manifest this runtime reads: {e!r}") from e
    for name, digest in manifest.files.items():
        file = resolve_inside(root, name)
        if not file.is_file():
            raise BundleError(f"bundle file {name} is missing")
        if verify and sha256_file(file) != digest:
            raise BundleError(f"bundle file {name} does not match its sha256 in {MANIFEST} (altered or corrupt)")
    graphs = {}
    for name, graph in manifest.graphs.items():
        for key in ("onnx", "onnx_data"):
            file = getattr(graph, key)
            if file is not None and file not in manifest.files:
                raise BundleError(f"graph {name}'s {key} file {file} is not among the manifest's checked files")
        graphs[name] = GraphFiles(onnx=resolve_inside(root, graph.onnx), inputs=graph.inputs, outputs=graph.outputs)
    for kind, target in manifest.compiled.items():
        for name, file in target.files.items():
            if name not in manifest.graphs:
                raise BundleError(f"{MANIFEST}'s {kind} files name a graph {name!r} the bundle does not have")
            if file not in manifest.files:
                raise BundleError(f"graph {name}'s {kind} file {file} is not among the manifest's checked files")
    return Bundle(root=root, manifest=manifest, graphs=graphs)

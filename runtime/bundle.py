"""A model bundle: `manifest.json` plus the files it names, each with its sha256.

Loading needs nothing but the standard library and numpy. A bundle is refused, naming the file, when
the schema version is not ours, a named file is missing, altered, or would lie outside the bundle
directory (absolute paths, `..`, symlinks).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.spec import PolicySpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
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


@dataclass(frozen=True)
class GraphFiles:
    onnx: Path
    om: Path | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    spec: PolicySpec
    graphs: dict[str, GraphFiles]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

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
            empty_cameras=self.spec.empty_cameras + self.manifest.get("empty_cameras_dropped", 0),
            tokenizer_max_length=self.manifest.get("checkpoint_token_budget", self.spec.tokenizer_max_length),
        )

    @property
    def tokenizer(self) -> Path | None:
        name = self.manifest["prompt"]["tokenizer"]
        return None if name is None else self.root / name


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and (by default) verify a bundle directory."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} not found")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{manifest_path} is not valid JSON: {e}") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path} has schema version {version!r}; this runtime reads {SCHEMA_VERSION}")
    for name, digest in manifest["files"].items():
        file = resolve_inside(root, name)
        if not file.is_file():
            raise BundleError(f"bundle file {name} is missing")
        if verify and sha256_file(file) != digest:
            raise BundleError(f"bundle file {name} does not match its sha256 in {MANIFEST} (altered or corrupt)")
    graphs = {}
    for name, graph in manifest["graphs"].items():
        for key in ("onnx", "onnx_data", "om"):
            if graph.get(key) is not None and graph[key] not in manifest["files"]:
                raise BundleError(f"graph {name}'s {key} file {graph[key]} is not among the manifest's checked files")
        graphs[name] = GraphFiles(
            onnx=resolve_inside(root, graph["onnx"]),
            om=None if graph.get("om") is None else resolve_inside(root, graph["om"]),
            inputs=graph["inputs"],
            outputs=graph["outputs"],
        )
    return Bundle(root=root, manifest=manifest, spec=PolicySpec.from_dict(manifest["policy"]), graphs=graphs)

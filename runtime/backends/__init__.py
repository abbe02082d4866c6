"""Backends run a bundle's two graphs: the VLM once per observation, the action expert per step.

The seam, by name:
- `Backend`: what the engine calls. `prefix(inputs, graph)` runs a VLM graph (`vlm`, or guidance's
  `vlm_guided` over two prompts) and returns a `PrefixHandle`, an opaque handle on that observation's prefix
  cache, which stays where the expert reads it (device memory on an accelerator) and never crosses to numpy;
  `velocity(handle, ..., guidance_scale)` runs one expert step on it (`expert`, or with a guidance scale
  `expert_guided`: both branches in one call). Several handles may be alive at once (up to
  `Capabilities.max_live_caches`), each its own cache; `handle.release()` (or dropping it) frees it for the
  next. Which expert graphs read which VLM graph's cache follows from the manifest's lists (`cache_readers`).
- `Capabilities`: what a backend declares about itself, read instead of its name: the artefact it runs
  (`runtime.bundle.manifest.ONNX`, or a compiled target such as `runtime.bundle.manifest.OM`), the library it needs, whether
  it holds the weights in host memory, how many prefix caches may be alive at once.
- `REGISTRY`: every backend, in the order `auto` prefers them; an entry names the module and class, so that
  a backend's library is imported only when that backend is chosen.

Adding one (say onnxruntime's CANN execution provider): a module here with a class that has `name`,
`capabilities` and the four methods, constructed as `Cls(bundle, options)`; one line in `REGISTRY`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from runtime.bundle.graphs import EXPERT, EXPERT_GUIDED, PREFIX_CACHE, VLM, VLM_GRAPHS
from runtime.bundle.manifest import Bundle, BundleError
from runtime.pipeline.model_io import ModelInputs

AUTO = "auto"


@dataclass(frozen=True)
class Capabilities:
    artefact: str  # which of the bundle's artefacts it runs: "onnx" or a `Manifest.compiled` kind ("om")
    library: str  # the module that must be importable for it ("acl", "onnxruntime")
    weights_in_host_memory: bool  # True: the service's memory bound must hold the weights (onnxruntime on CPU)
    max_live_caches: int | None  # prefix caches alive at once; None: as many as memory holds


@dataclass(frozen=True)
class BackendOptions:
    threads: int = 0  # intra-op threads where the backend computes on the CPU; 0: one per core
    device_id: int = 0  # the accelerator, where there is one
    live_caches: int | None = None  # prefix caches to allow at once; None: the backend's default
    # The ACL backend refuses an fp32 bundle (every matmul on the 310P's AI CPU: its Cube has no float32)
    # unless this is set (`serve --allow-ai-cpu`).
    allow_ai_cpu: bool = False


class PrefixHandle(Protocol):
    def release(self) -> None:
        """Give the cache's memory back now (dropping the handle does it too); using it afterwards fails."""
        ...


class Backend(Protocol):
    name: str
    capabilities: ClassVar[Capabilities]

    def prefix(self, inputs: ModelInputs, graph: str = VLM) -> PrefixHandle: ...

    def velocity(
        self, cache: Any, state: np.ndarray, x_t: np.ndarray, t: np.ndarray, guidance_scale: float | None = None
    ) -> np.ndarray: ...

    def close(self) -> None: ...

    def device_memory(self) -> tuple[int, int] | None:
        """(used, total) bytes of the accelerator's memory; None where the backend has none to report
        (called from the thread that runs `prefix` and `velocity`)."""
        ...


def expert_graph(guidance_scale: float | None) -> str:
    """The expert graph a step runs: guidance's (both branches, combined) when a scale is given."""
    return EXPERT if guidance_scale is None else EXPERT_GUIDED


def cache_readers(io: dict[str, tuple[list[dict], list[dict]]]) -> dict[str, tuple[str, ...]]:
    """graph -> (its inputs, its outputs) as the manifest lists them => for each graph that writes a prefix
    cache, the graphs that read it: those whose cache inputs are its outputs, by name and shape."""
    readers = {}
    for writer in (g for g in VLM_GRAPHS if g in io):
        written = {o["name"]: list(o["shape"]) for o in io[writer][1]}
        readers[writer] = tuple(
            reader
            for reader, (inputs, _) in io.items()
            if reader not in VLM_GRAPHS
            and all(written.get(i["name"]) == list(i["shape"]) for i in inputs if i["name"] in PREFIX_CACHE)
        )
    return readers


def check_reads(readers: dict[str, tuple[str, ...]], writer: str, reader: str) -> None:
    """A BundleError unless `reader` (an expert graph) can read the cache `writer` made."""
    if writer not in readers:
        raise BundleError(f"this bundle has no {writer} graph (exported without guidance, or another kind)")
    if reader not in readers[writer]:
        raise BundleError(
            f"a prefix cache of the {writer} graph is read by {list(readers[writer])}, not by {reader} "
            "(guidance over two prompts needs a guidance scale; a bundle without guidance has no guided expert)"
        )


@dataclass(frozen=True)
class BackendEntry:
    module: str
    cls: str

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


REGISTRY: dict[str, BackendEntry] = {
    "acl": BackendEntry("runtime.backends.acl", "AclBackend"),
    "onnxruntime": BackendEntry("runtime.backends.onnxruntime", "OnnxRuntimeBackend"),
}
BACKENDS = (AUTO, *REGISTRY)


def backend_class(name: str) -> type:
    if name not in REGISTRY:
        raise BundleError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    return REGISTRY[name].load()


def capabilities(name: str) -> Capabilities:
    return backend_class(name).capabilities


def _usable(name: str, bundle: Bundle) -> bool:
    caps = capabilities(name)
    return importlib.util.find_spec(caps.library) is not None and bundle.artefact(caps.artefact) is not None


def resolve_backend(bundle: Bundle, name: str = AUTO) -> str:
    """`auto` -> the first backend in `REGISTRY` whose library is importable here and whose artefact the
    bundle holds (ACL with OM files on a robot with CANN, else onnxruntime); any other name as given."""
    if name != AUTO:
        backend_class(name)  # an unknown name is refused here
        return name
    usable = [candidate for candidate in REGISTRY if _usable(candidate, bundle)]
    if not usable:
        raise BundleError(f"no backend can run this bundle here: none of {list(REGISTRY)} is installed with its files")
    return usable[0]


def make_backend(bundle: Bundle, name: str = AUTO, options: BackendOptions | None = None) -> Backend:
    """The backend asked for (`resolve_backend` says what `auto` takes), on the bundle's matching artefact."""
    name = resolve_backend(bundle, name)
    cls = backend_class(name)
    artefact = cls.capabilities.artefact
    if bundle.artefact(artefact) is None:
        target = bundle.manifest.compiled.get(artefact)
        how = f"; {target.script} has the commands" if target is not None and target.script else ""
        raise BundleError(f"the {name} backend runs {artefact} files, and this bundle has none{how}")
    return cls(bundle, options or BackendOptions())

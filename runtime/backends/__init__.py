"""Backends run a bundle's two graphs: the VLM once per observation, the action expert per step.

A backend keeps the VLM's prefix cache where the expert reads it (device memory on an accelerator):
`prefix` returns an opaque handle, `velocity` takes it back, and the cache never crosses to numpy.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from runtime.bundle import Bundle, BundleError

BACKENDS = ("auto", "acl", "onnxruntime")


def resolve_backend(bundle: Bundle, name: str = "auto") -> str:
    """`auto` -> `acl` when pyACL is importable and the bundle has OM files, else `onnxruntime`."""
    if name != "auto":
        return name
    has_om = all(g.om is not None for g in bundle.graphs.values())
    return "acl" if has_om and importlib.util.find_spec("acl") is not None else "onnxruntime"


def make_backend(bundle: Bundle, name: str = "auto", threads: int = 0) -> Any:
    """The backend asked for (`resolve_backend` says what `auto` takes)."""
    has_om = all(g.om is not None for g in bundle.graphs.values())
    name = resolve_backend(bundle, name)
    if name == "acl":
        if not has_om:
            raise BundleError("the acl backend needs OM files: this bundle was not compiled with atc")
        from runtime.backends.acl import AclBackend

        return AclBackend(bundle)
    if name == "onnxruntime":
        from runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, threads=threads or None)
    raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")

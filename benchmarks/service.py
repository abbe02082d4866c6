"""The service's own cost: a controller's round trip minus the engine's time, for three 480x640
cameras on loopback TCP (target: under 1 ms at p50), and the engine breakdown for pi0-dummy."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from exporter.bundle import BundleOptions, build_bundle
from exporter.presets import build_preset
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.bench import bench_engine, bench_server
from runtime.bundle import load_bundle
from runtime.engine import Engine

CAMERAS = ("observation.images.cam_high", "observation.images.cam_left_wrist", "observation.images.cam_right_wrist")


def run(n: int = 50) -> dict:
    policy = build_preset("pi0-dummy")
    policy.spec = dataclasses.replace(
        policy.spec, camera_keys=CAMERAS, camera_shapes=((3, 480, 640),) * 3, empty_cameras=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        build_bundle(policy, out, BundleOptions(), log=lambda message: None)
        bundle = load_bundle(out)
        engine = bench_engine(Engine(bundle, OnnxRuntimeBackend(bundle)), n)
        server = bench_server(bundle, n, backend="onnxruntime")
    return {"n": n, "engine": engine, "server": server}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))

"""Record what an openpi training config's robot transforms do, to prove a robot adapter against them.

Run by the exporter in the Python that has openpi (a user's own checkout, with their config in it), as a
plain script: it imports openpi and numpy only, never this project. For `--cases` random observations in
the request format given as JSON (`--request`: camera keys with their CHW shapes and which may be left
out, the state's fields and sizes), it applies the config's `data_transforms.inputs` (the robot's inputs,
and DeltaActions, a no-op without actions) and keeps the model-slot images, their masks and the state; then
random model-space actions (after openpi's Unnormalize) with that state through `data_transforms.outputs`
(AbsoluteActions, the robot's outputs). Everything goes into one .npz, which `exporter.robot_adapter`
compares with our pipeline. The norm stats are not read (the transforms compared come before Normalize
and after Unnormalize), so the config's assets are pointed at an empty folder, and the model transforms'
PaliGemma tokenizer (built by `create`, never used here) is left empty: nothing is downloaded.

    python openpi_recorder.py --config NAME --request JSON --out cases.npz [--cases 200] [--seed 0]
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from typing import Any

import numpy as np


def data_transforms(name: str, assets: str) -> tuple[Any, Any]:
    """The named config's DataConfig (its transforms) and model config, its assets in `assets`."""
    from openpi.models import tokenizer as _tokenizer
    from openpi.training import config as _config

    # `create` also builds the model transforms, whose PaliGemma tokenizer downloads its model; they are
    # not compared (not the robot's), so it is built empty.
    _tokenizer.PaligemmaTokenizer.__init__ = lambda self, max_len=48: setattr(self, "_max_len", max_len)
    train = _config.get_config(name)
    data = train.data
    if getattr(data, "assets", None) is not None:
        data = dataclasses.replace(data, assets=dataclasses.replace(data.assets, assets_dir=assets))
    train = dataclasses.replace(train, data=data, assets_base_dir=assets)
    return data.create(train.assets_dirs, train.model), train.model


def observation(rng: np.random.Generator, request: dict, index: int) -> dict:
    obs = {}
    for key, spec in request["cameras"].items():
        if spec.get("optional") and rng.random() < 0.3:
            continue
        c, h, w = spec["shape"]
        image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        layouts = request.get("layouts", ["hwc", "chw"])  # AlohaInputs takes CHW only
        obs[key] = image.transpose(2, 0, 1) if layouts[index % len(layouts)] == "chw" else image
    for key, size in request["state"]:
        obs[key] = rng.uniform(-1.5, 1.5, size).astype(np.float32)
    obs["prompt"] = "do the task"
    return obs


def nest(obs: dict, request: dict) -> dict:
    """ALOHA-style inputs take the cameras as `images: {camera: frame}`: the request format says under
    which key (`images_key`), or None for flat keys."""
    images_key = request.get("images_key")
    if images_key is None:
        return dict(obs)
    nested = {k: v for k, v in obs.items() if k not in request["cameras"]}
    nested[images_key] = {k: v for k, v in obs.items() if k in request["cameras"]}
    return nested


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--request", required=True, help="the request format, JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    request = json.loads(args.request)
    import openpi.transforms as _transforms

    with tempfile.TemporaryDirectory() as assets:
        config, model = data_transforms(args.config, assets)
    inputs = _transforms.compose(config.data_transforms.inputs)
    outputs = _transforms.compose(config.data_transforms.outputs)
    rng = np.random.default_rng(args.seed)
    arrays: dict[str, np.ndarray] = {}
    for i in range(args.cases):
        obs = observation(rng, request, i)
        got = inputs(nest(obs, request))
        for key, value in obs.items():
            if key != "prompt":
                arrays[f"{i}/obs/{key}"] = np.asarray(value)
        for slot, image in got["image"].items():
            arrays[f"{i}/image/{slot}"] = np.asarray(image)
            arrays[f"{i}/image_mask/{slot}"] = np.asarray(got["image_mask"][slot])
        state = np.asarray(got["state"], dtype=np.float64)
        arrays[f"{i}/state"] = state
        actions = rng.normal(size=(4, model.action_dim)).astype(np.float32)
        padded = np.zeros(model.action_dim, dtype=np.float64)
        padded[: state.shape[-1]] = state
        arrays[f"{i}/actions_in"] = actions
        # AbsoluteActions adds in place: openpi gets its own copy
        arrays[f"{i}/actions"] = np.asarray(outputs({"actions": actions.copy(), "state": padded})["actions"])
    meta = {"config": args.config, "cases": args.cases, "seed": args.seed, "request": request}
    np.savez(args.out, meta=np.array(json.dumps(meta)), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())

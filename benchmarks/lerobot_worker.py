"""LeRobot's own pi0, driven by `benchmarks/lerobot_side_by_side.py` from a separate environment.

Runs in the LeRobot benchmark venv (`make lerobot-venv`: lerobot 0.3.3 installed with --no-deps,
transformers 4.55.4); imports nothing from this repository. One JSON request per stdin line, one JSON
reply per stdout line:

    {"cmd": "make", "out": DIR, "cameras": [...], "empty_cameras": N, "state_dim": N, "seed": N,
     "tokenizer": PATH, "shape": SHAPE}
        writes a LeRobot checkpoint (PI0Policy.save_pretrained) of that shape, random weights, random
        normalization statistics
    {"cmd": "load", "checkpoint": DIR, "precision": "fp32" | "bf16", "tokenizer": PATH, "shape": SHAPE}
    {"cmd": "tokens", "inputs": NPZ}          -> the prompt's token ids as LeRobot makes them
    {"cmd": "infer", "inputs": NPZ, "out": NPZ} -> select_action's wall time; the whole chunk saved

SHAPE is the towers' dimensions in the names of the transformers configs LeRobot builds
(`{"vision": {"hidden_size": ..., "num_hidden_layers": ...}, "text": {...}, "expert": {...}}`): LeRobot's pi0
hard-codes them (`PaliGemmaWithExpertConfig`), so they are set on its configs as they are made, in "make" and
again in "load" (its config.json does not hold them); the driver sends pi0's real widths at a reduced depth,
or a tiny model for its smoke run.

Two things differ from a user's LeRobot, both because this machine has no network and LeRobot's pi0
hard-codes bfloat16: the tokenizer is built from a local SentencePiece file instead of being fetched
from the hub, and in "fp32" the module-level `torch` of LeRobot's pi0 files is replaced by a view of
torch whose `bfloat16` is `float32`, so its hard-coded casts (and `to_bfloat16_like_physical_intelligence`)
keep everything in float32. "bf16" is LeRobot as shipped.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

Shape = dict[str, dict[str, int]]


class Float32Torch:
    """`torch`, except that `torch.bfloat16` is `torch.float32`."""

    bfloat16 = torch.float32

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)


def patch_lerobot(precision: str, tokenizer: str | None, shape: Shape) -> None:
    import transformers
    from lerobot.policies.pi0 import modeling_pi0, paligemma_with_expert

    original_init = paligemma_with_expert.PaliGemmaWithExpertConfig.__init__

    def shaped_init(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        paligemma = self.paligemma_config
        for config, name in ((paligemma.vision_config, "vision"), (paligemma.text_config, "text"),
                             (self.gemma_expert_config, "expert")):  # fmt: skip
            for key, value in shape[name].items():
                setattr(config, key, value)
        # the projector maps SigLIP's output onto the language model's width
        width = paligemma.text_config.hidden_size
        paligemma.projection_dim = paligemma.vision_config.projection_dim = paligemma.hidden_size = width

    paligemma_with_expert.PaliGemmaWithExpertConfig.__init__ = shaped_init
    if precision == "fp32":
        modeling_pi0.torch = paligemma_with_expert.torch = Float32Torch()

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(name: str, **kwargs) -> transformers.PreTrainedTokenizerBase:
            if tokenizer is None:
                raise RuntimeError(f"no network: give a local tokenizer instead of {name}")
            return transformers.GemmaTokenizer(vocab_file=tokenizer)

    modeling_pi0.AutoTokenizer = LocalTokenizer


def make_checkpoint(out: str, cameras: list[str], empty_cameras: int, state_dim: int, seed: int, shape: Shape) -> dict:
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    torch.manual_seed(seed)
    features = {f"observation.images.{c}": PolicyFeature(FeatureType.VISUAL, (3, 480, 640)) for c in cameras}
    for i in range(empty_cameras):
        features[f"observation.images.empty_camera_{i}"] = PolicyFeature(FeatureType.VISUAL, (3, 480, 640))
    features["observation.state"] = PolicyFeature(FeatureType.STATE, (state_dim,))
    config = PI0Config(
        input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (state_dim,))},
        normalization_mapping={
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        },
        chunk_size=50,
        n_action_steps=50,
        num_steps=10,
        empty_cameras=empty_cameras,
        proj_width=shape["expert"]["hidden_size"],  # the action expert's width
        device="cpu",
    )
    stats = {
        key: {"mean": torch.randn(state_dim) * 0.1, "std": torch.rand(state_dim) + 0.5}
        for key in ("observation.state", "action")
    }
    policy = PI0Policy(config, dataset_stats=stats)
    policy.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in policy.parameters())}


class Runner:
    def __init__(self, checkpoint: str, precision: str, tokenizer: str) -> None:
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy

        self.policy = PI0Policy.from_pretrained(checkpoint).eval()
        if precision == "fp32":
            self.policy.to(torch.float32)
        self.dtypes = sorted({str(p.dtype) for p in self.policy.parameters()})

    def batch(self, path: str) -> dict:
        data = np.load(path, allow_pickle=False)
        batch = {"task": [str(data["prompt"])], "observation.state": torch.from_numpy(data["state"][None])}
        for key in data.files:
            if key.startswith("image."):  # HxWx3 uint8 -> 1x3xHxW float in [0, 1], as LeRobot's envs give
                image = torch.from_numpy(data[key]).permute(2, 0, 1)[None].float() / 255.0
                batch[f"observation.images.{key.removeprefix('image.')}"] = image
        return batch

    def tokens(self, path: str) -> dict:
        tokens, mask = self.policy.prepare_language(self.batch(path))
        return {"tokens": tokens[0].tolist(), "mask": mask[0].tolist()}

    def infer(self, path: str, out: str) -> dict:
        batch = self.batch(path)
        noise = torch.from_numpy(np.load(path, allow_pickle=False)["noise"])
        self.policy.reset()
        start = time.perf_counter()
        first = self.policy.select_action(batch, noise=noise)
        seconds = time.perf_counter() - start
        chunk = torch.stack([first, *self.policy._action_queue], dim=1)[0]  # the whole chunk LeRobot made
        np.save(out, chunk.float().numpy(), allow_pickle=False)
        return {"seconds": seconds}


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    runner: Runner | None = None
    handlers: dict[str, Callable[[dict], dict]] = {}

    def load(request: dict) -> dict:
        nonlocal runner
        patch_lerobot(request["precision"], request["tokenizer"], request["shape"])
        runner = Runner(request["checkpoint"], request["precision"], request["tokenizer"])
        return {"dtypes": runner.dtypes, "torch": torch.__version__, "threads": torch.get_num_threads()}

    def make(request: dict) -> dict:
        patch_lerobot("fp32", request["tokenizer"], request["shape"])
        args = {k: request[k] for k in ("out", "cameras", "empty_cameras", "state_dim", "seed", "shape")}
        return make_checkpoint(**args)

    handlers.update(
        make=make,
        load=load,
        tokens=lambda r: runner.tokens(r["inputs"]),
        infer=lambda r: runner.infer(r["inputs"], r["out"]),
    )
    replies, sys.stdout = sys.stdout, sys.stderr  # anything LeRobot prints goes to stderr, not the protocol
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": True, **handlers[request["cmd"]](request)}
        except Exception as error:  # reported to the driver, which stops the benchmark
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    main()

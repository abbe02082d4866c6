"""`pi0-sim train`: a pi0-architecture policy trained by flow matching on recorded demonstrations, saved
as a LeRobot v0.3 checkpoint so that everything after training runs the path a user's checkpoint runs
(loader, exporter, validation, bundle, daemon, client).

The data are `pi0-sim record` episodes (the scripted oracle, transfer-cube). Each frame becomes one
sample, with the transforms the daemon applies at serving time, called from `runtime/` (one place for
each): the camera frame resized with pad (LeRobot v0.3 conventions), the state through the ALOHA
decoding and the recordings' own MEAN_STD statistics, the next `chunk` actions through the inverse of
the serving post-processing (`runtime.pipeline.model_io.actions_to_model`); steps beyond an episode's end repeat
its last action and are left out of the loss, as LeRobot's `action_is_pad` does. The prompt is the
recordings' own, tokenized with the tokenizer the bundle will ship. Loss: pi0's flow matching, x_t =
t noise + (1 - t) actions, target noise - actions, t ~ Beta(1.5, 1) scaled to [0.001, 1]; AdamW, linear warm-up (a tenth of the run, at most 100 steps), cosine
decay, gradients clipped at norm 1.

Seeded; resumable (`train_state.safetensors` + `train_state.json` in the output directory hold the
weights, the optimizer's moments, the step, the schedule and the random generator's state: no pickle;
`--resume` continues from them); progress shown every `log_every`
steps. The model is `PRESETS[preset]` (`pi0-cpu`: towers sized for a CPU, 112 px images). The output
directory also gets `recipe.json` (the commands, settings, the demonstrations' seeds: an evaluation holds
them out), `losses.csv`, and with `snapshot_every` a checkpoint every N steps (a learning curve). No
augmentation: gym-aloha's camera, lighting and table never change; only the cube's place does, and 100
demonstrations cover its range.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.checkpoint import LoadedPolicy
from exporter.dims import PRESETS
from exporter.pi0 import Pi0
from exporter.presets import preset_spec
from exporter.readers.lerobot_v03 import save_lerobot
from exporter.safetensors_io import SafetensorsFile, write_safetensors
from runtime.bundle.spec import NormStats, PolicySpec
from runtime.pipeline import transforms
from runtime.pipeline.model_io import actions_to_model, model_state
from runtime.pipeline.tokenizer import PromptTokenizer
from sim.errors import SimError, existing_file
from sim.record import aloha_norm_stats, episode_directories, load_episode
from sim.settings import TrainSettings, from_arguments, to_arguments

STATE = "train_state"  # .safetensors (weights, optimizer moments) + .json (step, losses, generators): no pickle


@dataclass
class Demonstrations:
    """Every sample the daemon would see, preprocessed once: images [N, 1, 3, H, W] (float16, [-1, 1]),
    model states [N, max_state_dim], action chunks [N, chunk, max_action_dim], and which chunk steps
    are real [N, chunk]."""

    images: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    real: np.ndarray
    tokens: np.ndarray
    token_mask: np.ndarray
    spec: PolicySpec
    seeds: list[int]  # the recordings' env seeds: an evaluation holds them out

    @classmethod
    def load(
        cls, directory: Path, tokenizer: Path, stride: int = 1, image_size: int = 224,
        log: Callable[[str], None] = lambda line: None,
    ) -> Demonstrations:  # fmt: skip
        paths = episode_directories(Path(directory))
        episodes = [load_episode(p, frames=False) for p in paths]  # the frames: one episode at a time, below
        stats = aloha_norm_stats(episodes)
        spec = replace(
            preset_spec(image_size=image_size),
            empty_cameras=0,
            state_norm=NormStats.from_dict(stats["observation.state"]),
            action_norm=NormStats.from_dict(stats["action"]),
        )
        prompts = {e.prompt for e in episodes}
        if len(prompts) != 1:
            raise SimError(f"the episodes have {len(prompts)} different prompts; train on one task: {sorted(prompts)}")
        tokens, token_mask = PromptTokenizer(tokenizer, spec.tokenizer_max_length, spec.convention_set.prompt)(
            prompts.pop()
        )
        images, states, actions, real = [], [], [], []
        for i, path in enumerate(paths):
            if i % 10 == 0:
                log(f"reading {directory}: episode {i + 1}/{len(paths)}")
            episode = load_episode(path)
            (frames,) = episode.images.values()
            robot = actions_to_model(spec, episode.actions)  # [T, max_action_dim]
            for t in range(0, len(episode), stride):
                ahead = np.arange(t, t + spec.chunk_size)
                image = transforms.prepare_image(frames[t], spec.image_size, spec.convention_set)
                images.append(image[None].astype(np.float16))
                states.append(transforms.pad_vector(model_state(spec, episode.states[t]), spec.max_state_dim))
                actions.append(robot[np.minimum(ahead, len(episode) - 1)])
                real.append(ahead < len(episode))
        return cls(
            np.stack(images), np.stack(states), np.stack(actions), np.stack(real),
            tokens, token_mask, spec, [e.meta.get("seed") for e in episodes],
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        n = len(index)
        return {
            "images": torch.from_numpy(self.images[index].astype(np.float32)),
            "image_masks": torch.ones(n, 1, dtype=torch.bool),
            "tokens": torch.from_numpy(np.repeat(self.tokens, n, axis=0).astype(np.int64)),
            "token_mask": torch.from_numpy(np.repeat(self.token_mask, n, axis=0)),
            "state": torch.from_numpy(self.states[index]),
            "actions": torch.from_numpy(self.actions[index]),
            "real": torch.from_numpy(self.real[index]),
        }


def flow_matching_loss(
    model: Pi0, batch: dict[str, torch.Tensor], noise: torch.Tensor, t: torch.Tensor, action_dim: int
) -> torch.Tensor:
    """pi0's objective: the velocity at x_t = t noise + (1 - t) actions should be noise - actions (over
    the robot's action dims and the chunk steps that are real)."""
    actions = batch["actions"]
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    keys, values, prefix_mask = model.prefix_kv(
        batch["images"], batch["image_masks"], batch["tokens"], batch["token_mask"]
    )
    velocity = model.velocity(batch["state"], x_t, t, keys, values, prefix_mask)
    error = (velocity - (noise - actions))[..., :action_dim] ** 2
    real = batch["real"][..., None].to(error.dtype)
    return (error * real).sum() / (real.sum() * action_dim)


def save_state(
    out: Path, model: Pi0, optimizer: torch.optim.Optimizer, schedule: Any, rng: np.random.Generator, step: int,
    losses: list[float],
) -> None:  # fmt: skip
    """The training state as safetensors + JSON, each written whole then renamed into place."""
    params = list(model.parameters())
    tensors = {f"model.{name}": t.detach() for name, t in model.state_dict().items()}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).detach()
    info = {"step": step, "losses": losses, "rng": rng.bit_generator.state, "schedule": schedule.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}  # fmt: skip
    write_safetensors(out / f"{STATE}.safetensors.tmp", tensors)
    (out / f"{STATE}.json.tmp").write_text(json.dumps(info))
    (out / f"{STATE}.safetensors.tmp").replace(out / f"{STATE}.safetensors")
    (out / f"{STATE}.json.tmp").replace(out / f"{STATE}.json")


def state_files(out: Path) -> tuple[Path, Path]:
    """The training state `save_state` wrote into `out` (weights, the rest); a SimError if it is not there."""
    weights, info = out / f"{STATE}.safetensors", out / f"{STATE}.json"
    if not weights.is_file() or not info.is_file():
        raise SimError(f"--resume: no training state in {out} ({weights.name}, {info.name})")
    return weights, info


def load_state(
    out: Path, model: Pi0, optimizer: torch.optim.Optimizer, schedule: Any, rng: np.random.Generator
) -> tuple[int, list[float]]:
    """What `save_state` wrote, put back into the model, optimizer, schedule and generator."""
    weights, info = state_files(out)
    saved, meta = SafetensorsFile(weights), json.loads(info.read_text())
    model.load_state_dict({name: saved.tensor(f"model.{name}").clone() for name in model.state_dict()})
    names = set(saved.tensor_names())
    for i, p in enumerate(model.parameters()):
        moments = {
            k: saved.tensor(f"adam.{i}.{k}") for k in ("step", "exp_avg", "exp_avg_sq") if f"adam.{i}.{k}" in names
        }
        if moments:
            optimizer.state[p] = moments
    for group, stored in zip(optimizer.param_groups, meta["param_groups"], strict=True):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    schedule.load_state_dict(meta["schedule"])
    rng.bit_generator.state = meta["rng"]
    return meta["step"], meta["losses"]


def train(
    episodes: Path,
    out: Path,
    tokenizer: Path,
    settings: TrainSettings | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train and write `out/checkpoint/` (LeRobot v0.3: config, weights, statistics) and `out/tokenizer.model`
    beside `out/train_state.*` and `out/losses.csv` (`settings`: the defaults when None). -> the checkpoint
    directory."""
    settings = settings or TrainSettings()
    out.mkdir(parents=True, exist_ok=True)
    dims = PRESETS[settings.preset]
    data = Demonstrations.load(episodes, tokenizer, settings.frame_stride, dims.vision.image_size, log)
    log(f"{len(data)} samples from {episodes} (every {settings.frame_stride} frame(s)), preset {settings.preset}")
    torch.manual_seed(settings.seed)
    model = Pi0(dims).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(settings.seed)
    warmup = max(1, min(100, settings.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, settings.steps) / settings.steps)),
    )
    step, losses = 0, []
    if resume:
        step, losses = load_state(out, model, optimizer, schedule, rng)
        log(f"resumed at step {step}")
    start = time.perf_counter()
    while step < settings.steps:
        index = rng.integers(0, len(data), settings.batch_size)
        batch = data.batch(index)
        noise = torch.from_numpy(rng.standard_normal(batch["actions"].shape, dtype=np.float32))
        t = torch.from_numpy((rng.beta(1.5, 1.0, settings.batch_size) * 0.999 + 0.001).astype(np.float32))
        loss = flow_matching_loss(model, batch, noise, t, data.spec.action_dim)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(loss.item())
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            save_state(out, model, optimizer, schedule, rng, step, losses)
        if settings.snapshot_every and step % settings.snapshot_every == 0 and step < settings.steps:
            with torch.no_grad():
                snapshot = LoadedPolicy(model=model, spec=data.spec, source=f"pi0-sim train:{settings.preset}@{step}")
                log(f"snapshot: {save_lerobot(snapshot, out / 'checkpoints' / f'step_{step:06d}')}")
        if step % settings.log_every == 0 or step == settings.steps:
            recent = np.mean(losses[-settings.log_every :])
            rate = (time.perf_counter() - start) / max(1, len(losses[-settings.log_every :]))
            log(
                f"step {step}/{settings.steps}: loss {recent:.4f}, lr {schedule.get_last_lr()[0]:.2e}, {rate:.2f} s/step"
            )
            start = time.perf_counter()
    recipe = {
        "command": f"pi0-sim record --seed {min(data.seeds)} --episodes {len(data.seeds)} --out DEMOS && "
        f"pi0-sim train DEMOS --out OUT {shlex.join(to_arguments(settings))}",
        "settings": asdict(settings),
        "demonstrations": {"directory": str(episodes), "episodes": len(data.seeds), "seeds": data.seeds,
                           "samples": len(data)},
        "final_loss": float(np.mean(losses[-settings.log_every :])),
        "torch": torch.__version__,
    }  # fmt: skip
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    (out / "losses.csv").write_text("step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
    (out / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    final = model.eval().requires_grad_(False).to(getattr(torch, settings.weights_dtype))
    policy = LoadedPolicy(model=final, spec=data.spec, source=f"pi0-sim train:{settings.preset}")
    checkpoint = save_lerobot(policy, out / "checkpoint")
    log(
        f"checkpoint written to {checkpoint} (LeRobot v0.3); export it with pi0-export bundle --tokenizer {out / 'tokenizer.model'}"
    )
    return checkpoint


def command(args: argparse.Namespace) -> int:
    """`pi0-sim train`: `train` with the command line's settings, its paths checked before anything runs."""
    episode_directories(args.episodes)
    if args.tokenizer is not None:
        existing_file(args.tokenizer, "--tokenizer", "a SentencePiece model")
    if args.resume:
        state_files(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is not None:
        tokenizer = args.tokenizer
    else:
        from exporter.tokenizer_train import train_tokenizer

        tokenizer = train_tokenizer(args.out / "tokenizer.model")
    settings = from_arguments(TrainSettings, args)
    train(args.episodes, args.out, tokenizer, settings, resume=args.resume, log=logging.getLogger("pi0-sim").info)
    return 0

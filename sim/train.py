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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.checkpoint import LoadedPolicy, load_checkpoint
from exporter.dims import PRESETS
from exporter.pi0 import Pi0
from exporter.presets import preset_spec
from exporter.readers.lerobot_v03 import save_lerobot
from exporter.safetensors_io import SafetensorsFile, write_safetensors
from runtime.bundle.spec import NormStats, PolicySpec
from runtime.pipeline import transforms
from runtime.pipeline.model_io import actions_to_model, model_state
from runtime.pipeline.tokenizer import PromptTokenizer
from sim.errors import SimError, existing_directory, existing_file
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
    successes: np.ndarray  # [N] bool: whether each sample's episode succeeded (its label for guidance)

    @classmethod
    def load(
        cls, directories: Sequence[Path], tokenizer: Path, stride: int = 1, image_size: int = 224,
        log: Callable[[str], None] = lambda line: None, spec: PolicySpec | None = None,
    ) -> Demonstrations:  # fmt: skip
        """`spec`: the normalization to train in (a fine-tune keeps its checkpoint's); by default the
        episodes' own statistics."""
        paths = [p for directory in directories for p in episode_directories(Path(directory))]
        episodes = [load_episode(p, frames=False) for p in paths]  # the frames: one episode at a time, below
        if spec is None:
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
        images, states, actions, real, successes = [], [], [], [], []
        for i, path in enumerate(paths):
            if i % 10 == 0:
                log(f"reading {path.parent}: episode {i + 1}/{len(paths)}")
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
                successes.append(bool(episode.meta.get("success", False)))
        return cls(
            np.stack(images), np.stack(states), np.stack(actions), np.stack(real),
            tokens, token_mask, spec, [e.meta.get("seed") for e in episodes], np.array(successes),
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
    the robot's action dims and the chunk steps that are real); a conditioned model's samples carry their
    condition (`batch["condition"]`: 1 positive, 0 unconditioned)."""
    actions = batch["actions"]
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    keys, values, prefix_mask = model.prefix_kv(
        batch["images"], batch["image_masks"], batch["tokens"], batch["token_mask"]
    )
    velocity = model.velocity(batch["state"], x_t, t, keys, values, prefix_mask, batch.get("condition"))
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


def initial_model(settings: TrainSettings, log: Callable[[str], None]) -> tuple[Pi0, PolicySpec | None]:
    """The model to train (seeded) and the spec to train in: the preset's, fresh (the spec then comes from
    the episodes), or `settings.init`'s checkpoint, weights and statistics; with `settings.condition` a
    condition embedding too, zero where the checkpoint has none (both branches start as the checkpoint)."""
    start = None
    if settings.init is not None:
        start = load_checkpoint(settings.init)
        log(f"starting from {settings.init} ({start.source})")
    dims = PRESETS[settings.preset] if start is None else start.model.dims
    if settings.condition:
        dims = replace(dims, condition="bias")
    torch.manual_seed(settings.seed)
    model = Pi0(dims).train()
    if start is not None:
        weights = dict(start.model.state_dict())
        if settings.condition and "condition_embedding.weight" not in weights:
            weights["condition_embedding.weight"] = torch.zeros_like(model.condition_embedding.weight)
        model.load_state_dict(weights)
    return model, None if start is None else start.spec


def condition_labels(data: Demonstrations, index: np.ndarray, dropout: float, rng: np.random.Generator) -> torch.Tensor:
    """Each sample's condition: positive (1) where its episode succeeded, except a `dropout` share of those,
    and unconditioned (0) otherwise."""
    positive = data.successes[index] & (rng.random(len(index)) >= dropout)
    return torch.from_numpy(positive.astype(np.int64))


def train(
    episodes: Path | Sequence[Path],
    out: Path,
    tokenizer: Path,
    settings: TrainSettings | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train and write `out/checkpoint/` (LeRobot v0.3: config, weights, statistics) and `out/tokenizer.model`
    beside `out/train_state.*` and `out/losses.csv` (`settings`: the defaults when None), from the episodes
    of one directory or several. -> the checkpoint directory."""
    settings = settings or TrainSettings()
    directories = [Path(episodes)] if isinstance(episodes, str | Path) else [Path(d) for d in episodes]
    if not 0.0 <= settings.condition_dropout < 1.0:
        raise SimError(f"--condition-dropout {settings.condition_dropout}: a share, from 0 up to (not) 1")
    out.mkdir(parents=True, exist_ok=True)
    model, spec = initial_model(settings, log)
    dims = model.dims
    data = Demonstrations.load(directories, tokenizer, settings.frame_stride, dims.vision.image_size, log, spec)
    if settings.condition and not data.successes.any():
        raise SimError("--condition: no episode succeeded, so there is nothing to condition on")
    log(
        f"{len(data)} samples from {', '.join(map(str, directories))} (every {settings.frame_stride} frame(s)), "
        + (f"from {settings.init}" if settings.init else f"preset {settings.preset}")
        + (f", conditioned: {data.successes.mean():.0%} of the samples from successes" if settings.condition else "")
    )
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
        if settings.condition:  # drawn only then: an unconditioned run's generator is what it always was
            batch["condition"] = condition_labels(data, index, settings.condition_dropout, rng)
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
        "command": (
            f"pi0-sim record --seed {min(data.seeds)} --episodes {len(data.seeds)} --out DEMOS && "
            f"pi0-sim train DEMOS --out OUT {shlex.join(to_arguments(settings))}"
            if len(directories) == 1  # several: each directory's meta.json names its source and seeds
            else f"pi0-sim train {shlex.join(map(str, directories))} --out OUT {shlex.join(to_arguments(settings))}"
        ),
        "settings": asdict(settings),
        "demonstrations": {"directories": [str(d) for d in directories], "episodes": len(data.seeds), "seeds": data.seeds,
                           "samples": len(data)},
        "final_loss": float(np.mean(losses[-settings.log_every :])),
        "torch": torch.__version__,
    }  # fmt: skip
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
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
    for directory in args.episodes:
        episode_directories(directory)
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
    if settings.init is not None:
        existing_directory(settings.init, "--init")
    train(args.episodes, args.out, tokenizer, settings, resume=args.resume, log=logging.getLogger("pi0-sim").info)
    return 0

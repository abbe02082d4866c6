"""Recorded episodes: what a policy saw and did, step by step (format in docs/sim.md).

    DIR/episode_000000/meta.json   task, prompt, seed, fps, steps, success, max reward, source, array list
    DIR/episode_000000/data.npz    observation.images.top  uint8   [T, 480, 640, 3]
                                   observation.state       float32 [T, 14]
                                   action                  float32 [T, 14]
                                   reward                  float32 [T]

Row t is the observation the action of step t was chosen from. Plain numeric arrays only: loaded
with `allow_pickle=False`, nothing in a recording can execute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pi0_client.client import PolicyClient
from runtime.bundle.conventions import LEROBOT_03, Conventions
from runtime.bundle.spec import NormStats
from runtime.pipeline import transforms
from sim.env import DEFAULT_TASK, FPS
from sim.errors import SimError, existing_directory
from sim.harness import EpisodeResult, LocalPolicy, Policy, Step, run_episodes, write_json
from sim.settings import RunSettings, from_arguments

log = logging.getLogger("pi0-sim")
FORMAT = "pi0-sim-episode"
VERSION = 1


@dataclass(frozen=True)
class Episode:
    meta: dict[str, Any]
    images: dict[str, np.ndarray]  # by LeRobot feature name, [T, H, W, 3] uint8
    states: np.ndarray  # [T, 14]
    actions: np.ndarray  # [T, 14]
    rewards: np.ndarray  # [T]

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]

    def __len__(self) -> int:
        return len(self.states)


class EpisodeRecorder:
    """An `EpisodeWatcher` for `run_episodes` that saves each episode as `out/episode_NNNNNN/` (numbered
    from 0 in the order they ran), `meta` going into every meta.json."""

    def __init__(self, out: Path, **meta: Any) -> None:
        self.out, self.meta = out, meta
        self.steps: list[Step] = []
        self.saved: list[Path] = []

    def new_episode(self, seed: int) -> None:
        self.steps = []

    def __call__(self, step: Step) -> None:
        self.steps.append(step)

    def end_episode(self, result: EpisodeResult) -> None:
        self.saved.append(self.save(self.out / f"episode_{len(self.saved):06d}", result))
        log.info("episode (seed %d) saved to %s", result.seed, self.saved[-1])

    def save(self, directory: Path, result: EpisodeResult) -> Path:
        if not self.steps:
            raise SimError("nothing to save: the episode has no steps")
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "observation.images.top": np.stack([s.observation["pixels"]["top"] for s in self.steps]),
            "observation.state": np.stack([s.observation["agent_pos"] for s in self.steps]).astype(np.float32),
            "action": np.stack([s.action for s in self.steps]).astype(np.float32),
            "reward": np.array([s.reward for s in self.steps], dtype=np.float32),
        }
        np.savez_compressed(directory / "data.npz", **arrays)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            **self.meta,
            "seed": result.seed,
            "fps": FPS,
            "steps": result.steps,
            "success": result.success,
            "max_reward": result.max_reward,
            "arrays": {name: {"dtype": a.dtype.name, "shape": list(a.shape)} for name, a in arrays.items()},
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory


def episode_directories(directory: Path, flag: str = "episodes") -> list[Path]:
    """The recorded episodes in `directory` (those with a meta.json), in order; a SimError if none."""
    found = sorted(d for d in existing_directory(directory, flag).glob("episode_*") if (d / "meta.json").is_file())
    if not found:
        raise SimError(f"{flag} {directory}: no recorded episodes in it (pi0-sim record --out {directory})")
    return found


def load_episode(directory: Path, frames: bool = True) -> Episode:
    """One recorded episode; with `frames=False` its images are left out (an episode's frames are about
    200 MB: a training set is read one episode at a time)."""
    meta_path, data_path = directory / "meta.json", directory / "data.npz"
    if not meta_path.is_file() or not data_path.is_file():
        raise SimError(f"{directory} is not a recorded episode: expected meta.json and data.npz in it")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise SimError(
            f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')}; expected {FORMAT!r} v{VERSION}"
        )
    with np.load(data_path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if frames or not name.startswith("observation.images.")}
    missing = {"observation.state", "action", "reward"} - set(arrays)
    if missing:
        raise SimError(f"{data_path} lacks {sorted(missing)}")
    images = {k: v for k, v in arrays.items() if k.startswith("observation.images.")}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise SimError(f"{data_path}: arrays of different lengths {sorted(lengths)}")
    return Episode(meta, images, arrays["observation.state"], arrays["action"], arrays["reward"])


def recorded_seeds(directory: Path, flag: str = "--demonstrations") -> set[int]:
    """The env seeds of a `pi0-sim record` directory's episodes (read from their meta.json alone)."""
    return {json.loads((d / "meta.json").read_text())["seed"] for d in episode_directories(directory, flag)}


def aloha_norm_stats(episodes: list[Episode], conventions: Conventions = LEROBOT_03) -> dict[str, dict[str, Any]]:
    """MEAN_STD statistics of recorded states and actions, in pi0's ALOHA space (states decoded,
    actions through the inverse of the encoding), as LeRobot computes them for `adapt_to_pi_aloha`."""
    if not episodes:
        raise SimError("no episodes to compute statistics from")
    states = transforms.aloha_decode_state(np.concatenate([e.states for e in episodes]), conventions)
    actions = transforms.aloha_encode_actions_inv(np.concatenate([e.actions for e in episodes]), conventions)
    eps = conventions.norm_eps
    return {
        "observation.state": NormStats(states.mean(0), states.std(0), eps).to_dict(),
        "action": NormStats(actions.mean(0), actions.std(0), eps).to_dict(),
        "frames": len(states),
        "seeds": [e.meta.get("seed") for e in episodes],
        "recorded_from": sorted({str(e.meta.get("source")) for e in episodes}),
    }


def record_command(args: argparse.Namespace) -> int:
    """`pi0-sim record`: the in-process oracle's episodes (or a server's, `--endpoint`) saved under `--out`."""
    settings = from_arguments(RunSettings, args)
    args.out.mkdir(parents=True, exist_ok=True)  # a path that cannot be a directory fails now, not after an episode
    with contextlib.ExitStack() as stack:
        if args.endpoint:
            policy: Policy = stack.enter_context(PolicyClient(args.endpoint, timeout_s=settings.timeout))
            source = f"server:{args.endpoint}"
        elif settings.task != DEFAULT_TASK:
            raise SimError(f"the scripted oracle exists for {DEFAULT_TASK} only; give --endpoint to record a policy")
        else:
            from sim.oracle import TransferCubeOracle

            policy, source = LocalPolicy(TransferCubeOracle()), "oracle:transfer_cube"
        recorder = EpisodeRecorder(args.out, task=settings.task, prompt=settings.task_prompt, source=source)
        summary = run_episodes(policy, settings, endpoint=args.endpoint, watcher=recorder)
    return 2 if summary["aborted"] else 0


def stats_command(args: argparse.Namespace) -> int:
    """`pi0-sim stats`: the normalization statistics of a directory of recordings, printed or `--out`."""
    stats = aloha_norm_stats([load_episode(d) for d in episode_directories(args.episodes)])
    write_json(args.out, stats)
    if args.out is None:
        print(json.dumps(stats, indent=2))
    return 0

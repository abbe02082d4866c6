"""Open-loop parity: a recorded episode's observations through the PyTorch reference and through the
daemon serving the bundle, with the same noise, step by step.

The daemon gets the prompt as text and tokenizes it as it always does; the reference gets the tokens
the bundle defines for that text (its `Prompts`), so a tokenization difference would show as a
parity failure rather than be papered over. Differences are in the robot's units.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from typing import Any

import numpy as np

from exporter.validate import ABSOLUTE, compare
from pi0_client.client import PolicyClient
from runtime.engine import Engine, Prompts
from runtime.pipeline.model_io import initial_noise
from runtime.pipeline.observation import Observation
from sim.errors import SimError, existing_directory
from sim.harness import Policy, serve_bundle, write_json
from sim.record import Episode, load_episode

log = logging.getLogger("pi0-sim")


def open_loop_parity(
    episode: Episode,
    reference: Engine,
    prompts: Prompts,
    policy: Policy,
    *,
    precision: str,
    seed: int = 0,
    stride: int = 1,
    max_steps: int | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Per-step and overall max/mean abs diff and cosine of the action chunks; `passed` applies the
    bundle precision's end-to-end thresholds (fp32: max abs <= 1e-4)."""
    tokens, token_mask = prompts(episode.prompt)
    # The bundle's budget may be shorter than the checkpoint's (fixed prompts): pad it back, masked.
    pad = ((0, 0), (0, reference.spec.tokenizer_max_length - tokens.shape[1]))
    tokens, token_mask = np.pad(tokens, pad), np.pad(token_mask, pad)
    indices = list(range(0, len(episode), stride))[:max_steps]
    rows, ours, theirs = [], [], []
    for i, t in enumerate(indices):
        images = {key: frames[t] for key, frames in episode.images.items()}
        state = episode.states[t]
        noise = initial_noise(reference.spec, np.random.default_rng([seed, t]))
        want = reference.infer(Observation(images, state, tokens=tokens, token_mask=token_mask, noise=noise))[0]
        got = policy.infer(Observation(images, state, prompt=episode.prompt, noise=noise).to_dict())["actions"]
        rows.append({"step": t, **compare(got, want)})
        ours.append(got)
        theirs.append(want)
        if progress is not None:
            progress(i + 1, len(indices), rows[-1])
    overall = compare(np.stack(ours), np.stack(theirs))
    overall["mean_abs_worst_step"] = max(r["mean_abs"] for r in rows)
    overall["cosine_worst_step"] = min(r["cosine"] for r in rows)
    thresholds = ABSOLUTE[precision]
    passed = all(
        overall[name] >= limit if name == "cosine" else overall[name] <= limit for name, limit in thresholds.items()
    )
    return {
        "episode": episode.meta,
        "steps_compared": len(rows),
        "seed": seed,
        "precision": precision,
        "thresholds": thresholds,
        "overall": overall,
        "passed": passed,
        "per_step": rows,
    }


def command(args: argparse.Namespace) -> int:
    """`pi0-sim parity`: `open_loop_parity` of `--episode` between the checkpoint (`--checkpoint` or
    `--preset`) and a daemon serving `--bundle`; exit 1 outside the bundle precision's thresholds."""
    from exporter.source import load_source
    from exporter.torch_backend import reference_engine
    from runtime.bundle.manifest import load_bundle

    existing_directory(args.bundle, "--bundle", "manifest.json", "a bundle written by pi0-export bundle")
    if args.checkpoint is not None:
        existing_directory(args.checkpoint, "--checkpoint", what="the checkpoint the bundle was exported from")
    episode = load_episode(args.episode)
    bundle = load_bundle(args.bundle)
    reference = reference_engine(load_source(args))
    ours, theirs = bundle.checkpoint_spec.to_dict(), reference.spec.to_dict()
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    if differ:
        raise SimError(f"the bundle and the checkpoint disagree on {differ}: was the bundle exported from it?")

    def progress(done: int, total: int, row: dict[str, float]) -> None:
        if done == total or done % 10 == 0:
            log.info("step %d/%d: max abs %.2e, cosine %.8f", done, total, row["max_abs"], row["cosine"])

    with contextlib.ExitStack() as stack:
        endpoint = args.endpoint or stack.enter_context(serve_bundle(args.bundle, args.backend)).endpoint
        client = stack.enter_context(PolicyClient(endpoint, timeout_s=args.timeout))
        result = open_loop_parity(
            episode, reference, Prompts.from_bundle(bundle), client, precision=bundle.precision,
            seed=args.noise_seed, stride=args.stride, max_steps=args.max_steps, progress=progress,
        )  # fmt: skip
    result["bundle"] = str(args.bundle)
    write_json(args.report, result)
    shown = ("steps_compared", "overall", "thresholds", "passed")
    print(json.dumps({k: v for k, v in result.items() if k in shown}, indent=2))
    if not result["passed"]:
        log.error("parity failed: %s outside %s", result["overall"], result["thresholds"])
        return 1
    return 0

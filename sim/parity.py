"""Open-loop parity: a recorded episode's observations through the PyTorch reference and through the
daemon serving the bundle, with the same noise, step by step.

The daemon gets the prompt as text and tokenizes it as it always does; the reference gets the tokens
the bundle defines for that text (its `Prompts`), so a tokenization difference would show as a
parity failure rather than be papered over. Differences are in the robot's units.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.validate import ABSOLUTE, compare
from runtime.engine import Engine, Prompts
from runtime.observation import Observation
from runtime.pipeline import initial_noise
from sim.harness import Policy
from sim.record import Episode


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

"""The closed loop: gym-aloha observation -> policy -> the first K actions of its chunk -> repeat.

The policy is anything with the client's surface (`infer(obs) -> {"actions": ...}`, `metadata()`):
`pi0_client.PolicyClient` for a server (the daemon or the oracle), or `LocalPolicy` for an engine
in this process (recording without a server).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pi0_client.client import PolicyError
from pi0_client.metadata import Camera, Metadata
from runtime.observation import Observation
from runtime.service import ServedEngine
from runtime.stats import summarize
from sim.env import STATE_DIM, SimError, policy_request


class Policy(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...

    def metadata(self) -> Metadata: ...


class LocalPolicy:
    """An engine (see `runtime.service.ServedEngine`) called in-process with the client's API."""

    def __init__(self, engine: ServedEngine) -> None:
        self.engine = engine

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        actions, timing = self.engine.infer(Observation.from_dict(obs))
        return {"actions": actions, "timing": timing}

    def metadata(self) -> Metadata:
        return self.engine.metadata()


@dataclass
class Step:
    """What one env step saw and did (handed to the optional `on_step` callback)."""

    index: int
    observation: dict[str, Any]  # the observation the action was chosen from
    action: np.ndarray
    reward: float
    latency_ms: float  # round trip of the request whose chunk this action came from


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    max_reward: float
    steps: int
    requests: int
    latency_ms: list[float] = field(default_factory=list)  # client round trip per request
    server_ms: list[float] = field(default_factory=list)  # the server's own total per request
    sim_step_ms: list[float] = field(default_factory=list)
    error: str | None = None  # why the episode stopped early: an error reply, or the physics diverged

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "success": self.success,
            "max_reward": self.max_reward,
            "steps": self.steps,
            "requests": self.requests,
            "error": self.error,
            "latency_ms": summarize(self.latency_ms),
        }


def run_episode(
    env: Any,
    policy: Policy,
    *,
    seed: int,
    prompt: str | None,
    cameras: list[Camera],
    actions_per_chunk: int,
    max_steps: int | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> EpisodeResult:
    """One episode from `env.reset(seed)` until success, the env's time limit or `max_steps`, or until
    the policy answers with an error or MuJoCo gives up on the physics (both recorded in `error`; the
    policy's actions are never altered). No reply at all (`ServerUnavailableError`) propagates."""
    from dm_control.rl.control import PhysicsError  # after make_env: importing MuJoCo fixes its GL backend

    obs, _ = env.reset(seed=seed)
    result = EpisodeResult(seed=seed, success=False, max_reward=0.0, steps=0, requests=0)
    while True:
        start = time.perf_counter()
        try:
            reply = policy.infer(policy_request(obs, cameras, prompt))
        except PolicyError as e:  # the server refused or failed this request: the episode cannot go on
            result.error = f"policy error at step {result.steps}: {e}"
            return result
        latency = (time.perf_counter() - start) * 1e3
        result.requests += 1
        result.latency_ms.append(latency)
        if "total_ms" in reply.get("timing", {}):
            result.server_ms.append(reply["timing"]["total_ms"])
        actions = np.asarray(reply["actions"])
        if actions.ndim != 2 or actions.shape[1] != STATE_DIM or not np.isfinite(actions).all():
            raise SimError(
                f"the policy answered {actions.dtype} {list(actions.shape)}; expected [chunk, {STATE_DIM}] finite"
            )
        for action in actions[:actions_per_chunk]:
            seen = obs
            tick = time.perf_counter()
            try:
                obs, reward, terminated, truncated, info = env.step(action.astype(np.float64))
            except PhysicsError as e:
                result.error = f"physics diverged at step {result.steps}: {e}"
                return result
            result.sim_step_ms.append((time.perf_counter() - tick) * 1e3)
            result.steps += 1
            result.max_reward = max(result.max_reward, float(reward))
            result.success = bool(info.get("is_success", False))
            if on_step is not None:
                on_step(Step(result.steps - 1, seen, action, float(reward), latency))
            if terminated or truncated or (max_steps is not None and result.steps >= max_steps):
                return result


def report(results: list[EpisodeResult], **context: Any) -> dict[str, Any]:
    """The run's report: success rate, per-episode figures and latency statistics over all requests."""
    successes = sum(r.success for r in results)
    return {
        **context,
        "episodes": [r.summary() for r in results],
        "successes": successes,
        "errors": sum(r.error is not None for r in results),
        "success_rate": successes / len(results) if results else 0.0,
        "latency_ms": summarize(x for r in results for x in r.latency_ms),
        "server_total_ms": summarize(x for r in results for x in r.server_ms),
        "sim_step_ms": summarize(x for r in results for x in r.sim_step_ms),
    }

"""The closed loop: gym-aloha observation -> policy -> the first K actions of its chunk -> repeat.

With `delay` d, inference is taken to last d control steps, as on a robot that does not stop for it: the
next chunk is asked for d steps before the K actions run out, from the observation of that moment, and
the robot meanwhile executes those d actions of the old chunk; the new chunk then takes over at its
index d. With `rtc`, the request carries the old chunk's remaining actions (real-time chunking,
`runtime.pipeline.rtc`), so the new chunk's first d actions are the ones executed and the rest of the overlap is
pulled towards the old plan; without it the new chunk's first d actions are dropped (stale). A request
whose round trip is longer than d steps (at the env's 50 Hz) would have stalled a real controller: counted.
Each request's noise seed follows from the episode's seed and the request's index, so an episode repeats
exactly, and runs that differ in one setting (RTC on and off, say) start from the same noise.

The policy is anything with the client's surface (`infer(obs) -> {"actions": ...}`, `metadata()`, `reset()`):
`pi0_client.PolicyClient` for a server (the daemon or the oracle), or `LocalPolicy` for an engine
in this process (recording without a server). `run_episodes` runs a whole run (`RunSettings`) and makes
its report: `pi0-sim run` (`command`), each `pi0-sim eval` worker, `record` and the benchmark call it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from devtools.supervise import Daemon
from pi0_client.client import PolicyClient, PolicyError, ServerUnavailableError
from pi0_client.metadata import Camera, Metadata
from runtime.daemon.service import ServedEngine
from runtime.daemon.stats import summarize
from runtime.pipeline.observation import Observation
from sim.env import FPS, STATE_DIM, make_env, policy_request, task_named
from sim.errors import SimError, existing_directory
from sim.settings import RunSettings, from_arguments

log = logging.getLogger("pi0-sim")


class Policy(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...

    def metadata(self) -> Metadata: ...

    def reset(self) -> None: ...


class LocalPolicy:
    """An engine (see `runtime.daemon.service.ServedEngine`) called in-process with the client's API."""

    def __init__(self, engine: ServedEngine) -> None:
        self.engine = engine

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        actions, timing = self.engine.infer(Observation.from_dict(obs))
        return {"actions": actions, "timing": timing}

    def metadata(self) -> Metadata:
        return self.engine.metadata()

    def reset(self) -> None:
        """Nothing to forget between episodes (each request stands alone)."""


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
    episode_return: float = 0.0  # the sum of the env's rewards
    latency_ms: list[float] = field(default_factory=list)  # client round trip per request
    server_ms: list[float] = field(default_factory=list)  # the server's own total per request
    sim_step_ms: list[float] = field(default_factory=list)
    error: str | None = None  # why the episode stopped early: an error reply, or the physics diverged
    executed: list[np.ndarray] = field(default_factory=list)  # every action sent to the env
    boundaries: list[int] = field(default_factory=list)  # steps at which a new chunk took over
    stalls: int = 0  # requests whose round trip exceeded the delay: a real controller would have waited
    plan_jumps: list[float] = field(default_factory=list)  # at each switch: |new chunk's action - old plan's|

    def boundary_figures(self) -> dict[str, float | None]:
        """At each chunk boundary b: the plan jump (the new chunk's first executed action against what the
        old chunk had planned for that step; only with a delay), the action step |a[b] - a[b-1]| and the
        jerk |a[b+1] - 3a[b] + 3a[b-1] - a[b-2]| (max over joints); for scale, the median step within
        chunks. None where there is nothing to measure."""
        a = np.asarray(self.executed)
        steps, jerks = [], []
        for b in self.boundaries:
            if b >= 2 and b + 1 < len(a):
                steps.append(float(np.abs(a[b] - a[b - 1]).max()))
                jerks.append(float(np.abs(a[b + 1] - 3 * a[b] + 3 * a[b - 1] - a[b - 2]).max()))
        inside = [float(np.abs(a[i] - a[i - 1]).max()) for i in range(1, len(a)) if i not in set(self.boundaries)]
        return {
            "boundaries": len(steps),
            "max_plan_jump": max(self.plan_jumps, default=None),
            "mean_plan_jump": float(np.mean(self.plan_jumps)) if self.plan_jumps else None,
            "max_step": max(steps, default=None),
            "mean_step": float(np.mean(steps)) if steps else None,
            "max_jerk": max(jerks, default=None),
            "median_step_within_chunks": float(np.median(inside)) if inside else None,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "success": self.success,
            "max_reward": self.max_reward,
            "return": self.episode_return,
            "steps": self.steps,
            "requests": self.requests,
            "error": self.error,
            "latency_ms": summarize(self.latency_ms),
            "latency_ms_each": [round(x, 3) for x in self.latency_ms],
            "at_chunk_boundaries": self.boundary_figures(),
            "stalls": self.stalls,
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
    delay: int = 0,
    rtc: bool = False,
    end_on_success: bool = True,
    guidance_scale: float | None = None,
) -> EpisodeResult:
    """One episode from `env.reset(seed)` until success (unless `end_on_success` is off: then `success`
    says it succeeded at some step), the env's time limit or `max_steps`, or until the policy answers
    with an error or MuJoCo gives up on the physics (both recorded in `error`; the policy's actions are
    never altered). No reply at all (`ServerUnavailableError`) propagates. `delay` and `rtc`: see the
    module's doc."""
    from dm_control.rl.control import PhysicsError  # after make_env: importing MuJoCo fixes its GL backend

    if not 0 <= delay < actions_per_chunk or (rtc and not delay):
        raise SimError(f"delay {delay} must be below actions_per_chunk {actions_per_chunk}, and > 0 for RTC")
    camera = getattr(env.unwrapped, "top_camera", None)
    if camera is not None:
        camera.lazy = on_step is None  # frames only for requests, unless every step's observation is handed out
    obs, _ = env.reset(seed=seed)
    result = EpisodeResult(seed=seed, success=False, max_reward=0.0, steps=0, requests=0)

    def ask(seen: dict, prev: np.ndarray | None) -> tuple[np.ndarray, float] | None:
        if camera is not None:
            seen = camera.with_frame(seen)  # `seen` is always the latest observation: the physics is at it
        request = policy_request(seen, cameras, prompt)
        request["seed"] = seed * 1_000_003 + result.requests  # the same seed, the same noise: runs repeat exactly
        if guidance_scale is not None:
            request["guidance_scale"] = guidance_scale
        if prev is not None:
            request.update(prev_actions=prev, delay=delay)
        start = time.perf_counter()
        try:
            reply = policy.infer(request)
        except PolicyError as e:  # the server refused or failed this request: the episode cannot go on
            result.error = f"policy error at step {result.steps}: {e}"
            return None
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
        return actions, latency

    asked = ask(obs, None)
    if asked is None:
        return result
    (chunk, latency), index, pending = asked, 0, None
    while True:
        usable = min(actions_per_chunk, len(chunk))
        if delay and pending is None and index == usable - delay:
            pending = ask(obs, chunk[index:] if rtc else None)
            if pending is None:
                return result
            result.stalls += pending[1] > delay / FPS * 1e3
        action = chunk[index]
        seen = obs
        tick = time.perf_counter()
        try:
            obs, reward, terminated, truncated, info = env.step(action.astype(np.float64))
        except PhysicsError as e:
            result.error = f"physics diverged at step {result.steps}: {e}"
            return result
        result.sim_step_ms.append((time.perf_counter() - tick) * 1e3)
        result.executed.append(np.asarray(action, dtype=np.float32))
        result.steps += 1
        result.max_reward = max(result.max_reward, float(reward))
        result.episode_return += float(reward)
        succeeded = bool(info.get("is_success", False))
        result.success = result.success or succeeded
        if on_step is not None:
            on_step(Step(result.steps - 1, seen, action, float(reward), latency))
        ended = truncated or (terminated and (end_on_success or not succeeded))  # gym-aloha terminates at success
        if ended or (max_steps is not None and result.steps >= max_steps):
            return result
        index += 1
        if index >= usable:
            if pending is not None:  # computed while the last `delay` actions ran: it takes over at index delay
                planned = chunk[usable] if usable < len(chunk) else None
                (chunk, latency), index, pending = pending, delay, None
                if planned is not None:
                    result.plan_jumps.append(float(np.abs(chunk[index] - planned).max()))
            else:
                asked = ask(obs, None)
                if asked is None:
                    return result
                (chunk, latency), index = asked, 0
            result.boundaries.append(result.steps)


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
        "at_chunk_boundaries": _boundaries(results),
        "stalls": sum(r.stalls for r in results),
    }


def _boundaries(results: list[EpisodeResult]) -> dict[str, float | None]:
    return combine_boundary_figures([r.boundary_figures() for r in results])


def combine_boundary_figures(figures: list[dict[str, Any]]) -> dict[str, float | None]:
    """Episodes' `boundary_figures` (or their reports' `at_chunk_boundaries`) as one run's: maxima of the
    maxima, means of the means, the median of the medians; episodes without a boundary left out."""
    figures = [f for f in figures if f.get("boundaries")]

    def over(key: str, how: Callable[[list[float]], float]) -> float | None:
        values = [f[key] for f in figures if f[key] is not None]
        return float(how(values)) if values else None

    if not figures:
        return {}
    return {
        "boundaries": sum(f["boundaries"] for f in figures),
        "max_plan_jump": over("max_plan_jump", max),
        "mean_plan_jump": over("mean_plan_jump", np.mean),
        "max_step": over("max_step", max),
        "mean_step": over("mean_step", np.mean),
        "max_jerk": over("max_jerk", max),
        "median_step_within_chunks": over("median_step_within_chunks", np.median),
    }


class EpisodeWatcher(Protocol):
    """What sees every step of a run's episodes (`sim.video.EpisodeVideo`, `sim.record.EpisodeRecorder`)."""

    def new_episode(self, seed: int) -> None: ...

    def __call__(self, step: Step) -> None: ...

    def end_episode(self, result: EpisodeResult) -> None: ...


def episode_options(settings: RunSettings, metadata: Metadata) -> dict[str, Any]:
    """`run_episode`'s keyword arguments for `settings`, once the policy's metadata shows it is an ALOHA policy."""
    for name in ("state_dim", "action_dim"):
        if getattr(metadata, name) != STATE_DIM:
            raise SimError(f"the policy's {name} is {getattr(metadata, name)}; gym-aloha's ALOHA has {STATE_DIM}")
    per_chunk = settings.actions_per_chunk or metadata.chunk_size
    if not 1 <= per_chunk <= metadata.chunk_size:
        raise SimError(f"--actions-per-chunk {per_chunk}: the policy's chunks hold {metadata.chunk_size}")
    if settings.rtc and not settings.delay:
        raise SimError("--rtc needs --delay D (the control steps an inference is taken to last)")
    if settings.guidance_scale not in (None, 1.0) and "guidance" not in metadata.extra:
        raise SimError(f"--guidance-scale {settings.guidance_scale:g}: this policy was exported without guidance")
    return {
        "prompt": settings.task_prompt,
        "cameras": list(metadata.cameras),
        "actions_per_chunk": per_chunk,
        "max_steps": settings.max_steps,
        "delay": settings.delay,
        "rtc": settings.rtc,
        "end_on_success": settings.end_on_success,
        "guidance_scale": settings.guidance_scale,
    }


def run_episodes(
    policy: Policy, settings: RunSettings, *, endpoint: str | None = None, watcher: EpisodeWatcher | None = None
) -> dict[str, Any]:
    """`settings.episodes` episodes of `settings.task` on seeds `settings.seed`, `settings.seed + 1`, ...
    through `policy` (reset before each) -> the run's `report` (`endpoint` names the policy in it).
    An error reply ends its episode; no reply at all ends the run, and the report's `aborted` says where.
    `watcher`, if given, sees every step."""
    task = task_named(settings.task)
    metadata = policy.metadata()
    options = episode_options(settings, metadata)
    log.info(
        "policy %s (%s); %s, %d actions per chunk", metadata.source, metadata.backend, task.name,
        options["actions_per_chunk"],
    )  # fmt: skip
    env = make_env(task, render_fix=settings.render_fix)
    results, aborted = [], None
    try:
        for i, seed in enumerate(range(settings.seed, settings.seed + settings.episodes)):
            if watcher is not None:
                watcher.new_episode(seed)
            policy.reset()  # a broker's leftover actions belong to the last episode
            start = time.perf_counter()
            try:
                result = run_episode(env, policy, seed=seed, on_step=watcher, **options)
            except ServerUnavailableError as e:
                aborted = f"episode {i + 1} (seed {seed}): {e}"
                log.error("run aborted, %s", aborted)
                break
            results.append(result)
            if watcher is not None:
                watcher.end_episode(result)
            if result.error:
                log.warning("episode %d (seed %d) stopped early: %s", i + 1, seed, result.error)
            log.info(
                "episode %d/%d (seed %d): %s, max reward %.0f, %d steps, %d requests, latency p50 %.1f ms, %.1f s",
                i + 1, settings.episodes, seed, "success" if result.success else "no success", result.max_reward,
                result.steps, result.requests, result.summary()["latency_ms"].get("p50", float("nan")),
                time.perf_counter() - start,
            )  # fmt: skip
    finally:
        env.close()
    return report(
        results,
        task=task.name,
        prompt=options["prompt"],
        endpoint=endpoint,
        actions_per_chunk=options["actions_per_chunk"],
        render_fix=settings.render_fix,
        end_on_success=settings.end_on_success,
        policy=metadata.to_dict(),
        aborted=aborted,
    )


def setup_logging() -> None:
    """`pi0-sim`'s progress lines, timestamped, on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """A command's report, when it was asked for (`--report`, `--out`)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        log.info("wrote %s", path)


def serve_bundle(bundle: Path, backend: str | None = None) -> Daemon:
    """`pi0-runtime serve` on `bundle` (not started), with `backend` when given."""
    existing_directory(bundle, "--bundle", "manifest.json", "a bundle written by pi0-export bundle")
    return Daemon.serve(bundle, *(["--backend", backend] if backend else []))


def command(args: argparse.Namespace) -> int:
    """`pi0-sim run`: the episodes through `--endpoint`, a daemon on `--bundle` or openpi's client; exit 1
    below `--min-success-rate`, 2 when the server stopped answering."""
    settings = from_arguments(RunSettings, args)
    with contextlib.ExitStack() as stack:
        endpoint = args.endpoint
        if args.bundle is not None:
            daemon = serve_bundle(args.bundle, args.backend)
            log.info("starting the daemon on %s ...", args.bundle)
            endpoint = stack.enter_context(daemon).endpoint
        if args.openpi:
            from sim.openpi import OpenpiClientPolicy

            if settings.delay or settings.rtc:
                raise SimError("--delay/--rtc drive our client; openpi's broker asks only when its chunk is used up")
            policy: Policy = OpenpiClientPolicy(args.openpi, settings.actions_per_chunk)
            endpoint = f"ws://{args.openpi}"
            settings = replace(settings, actions_per_chunk=1)  # the broker hands out one action per call
        else:
            policy = stack.enter_context(PolicyClient(endpoint, timeout_s=settings.timeout))
        watcher: EpisodeWatcher | None = None
        if args.video is not None:
            from sim.video import EpisodeVideo

            watcher = stack.enter_context(EpisodeVideo(args.video))  # the file appears with the first frame
        summary = run_episodes(policy, settings, endpoint=endpoint, watcher=watcher)
    write_json(args.report, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("episodes", "policy")}, indent=2))
    if summary["aborted"]:
        return 2
    if args.min_success_rate is not None and summary["success_rate"] < args.min_success_rate:
        log.error("success rate %.2f is below --min-success-rate %.2f", summary["success_rate"], args.min_success_rate)
        return 1
    return 0

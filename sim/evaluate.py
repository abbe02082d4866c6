"""`pi0-sim eval`: task success through the served path, per policy, denoising steps and chunk joining.

Each configuration (a policy x a number of flow-matching steps x a way of joining chunks) is served once,
by the daemon for a bundle (`pi0-runtime serve --num-steps N`) or, for a checkpoint, by the exporter's
PyTorch reference engine behind the daemon's own server (`pi0-sim reference-serve`), and `workers`
processes share that server, each running `sim.harness.run_episodes` on a contiguous block of the seeds
(`python -m sim.evaluate ENDPOINT SETTINGS REPORT`, `worker` below: processes, so that episodes run in
parallel); their JSON reports are merged. With `--ray auto|ADDRESS` the blocks are Ray tasks on a cluster
instead, each serving the policy itself (`sim.cluster`, which says why); their reports are merged the same
way (`run_configuration`), and since every episode's outcome follows from its seed, the same seeds give the
same episodes either way. The ways of joining chunks (`MODES`): `sync` (the robot waits for each chunk),
`delay` (inference taken to last D control steps: the next chunk is asked for D steps early and its first
D actions, stale by then, are dropped) and `rtc` (the same with real-time chunking, `runtime.pipeline.rtc`).

Per configuration: successes out of n with a 95% Wilson interval, mean episode return (the sum of
gym-aloha's rewards; transfer-cube gives 1 for touching the cube, 2 lifted, 3 in both grippers, 4 on
success), the client's round-trip latency p50 over every request, stalls (with a delay) and errors, and
where chunks join (with a delay) the mean plan jump: |the new chunk's first executed action - what the
old chunk had planned for that step| (max over joints, radians or gripper units).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devtools.supervise import Daemon
from pi0_client.client import PolicyClient
from runtime.daemon.stats import summarize
from runtime.errors import run_command
from sim.errors import SimError, bindable, existing_directory, existing_file
from sim.harness import combine_boundary_figures, run_episodes, setup_logging, write_json
from sim.settings import MODES, EvalSettings, RunSettings, from_arguments

log = logging.getLogger("pi0-sim")


@dataclass(frozen=True)
class PolicyUnderTest:
    """A name for the table and what serves it: a bundle directory, or a checkpoint (PyTorch reference)."""

    name: str
    path: Path

    @property
    def is_bundle(self) -> bool:
        return (self.path / "manifest.json").is_file()

    @classmethod
    def parse(cls, text: str) -> PolicyUnderTest:
        """`NAME=PATH`, or a bare PATH named after its directory."""
        name, _, path = text.rpartition("=")
        directory = existing_directory(Path(path), "--policy", what="a bundle or a checkpoint")
        return cls(name or directory.name, directory)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate (sound at 0 or n successes, unlike p +- z sqrt(pq/n))."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def serve(policy: PolicyUnderTest, num_steps: int, tokenizer: Path | None) -> Daemon:
    """The server for one policy at `num_steps` (not started)."""
    if policy.is_bundle:
        return Daemon.serve(policy.path, "--num-steps", str(num_steps), quiet=True)
    if tokenizer is None:
        raise SimError(f"{policy.name}: a checkpoint's reference server needs --tokenizer (the bundle's tokenizer)")
    command = [sys.executable, "-m", "sim.cli", "reference-serve", "--checkpoint", str(policy.path)]
    return Daemon([*command, "--tokenizer", str(tokenizer), "--num-steps", str(num_steps)], quiet=True)


def blocks(seeds: tuple[int, ...], workers: int) -> list[tuple[int, ...]]:
    """`seeds` in up to `workers` contiguous blocks of near-equal size."""
    return [tuple(map(int, b)) for b in np.array_split(np.asarray(seeds), min(workers, len(seeds))) if len(b)]


def worker_settings(
    settings: EvalSettings, mode: str, block: tuple[int, ...], guidance_scale: float | None = None
) -> RunSettings:
    """What one worker runs: the seeds of `block` (contiguous), chunks joined as `mode` says, guided by
    `guidance_scale` (None: the bundle's default)."""
    if list(block) != list(range(block[0], block[0] + len(block))):
        raise SimError(f"seeds must form contiguous blocks per worker: {block}")
    return RunSettings(
        seed=block[0], episodes=len(block), actions_per_chunk=settings.actions_per_chunk,
        max_steps=settings.max_steps, prompt=settings.prompt, delay=0 if mode == "sync" else settings.delay,
        rtc=mode == "rtc", end_on_success=settings.end_on_success, guidance_scale=guidance_scale,
    )  # fmt: skip


# How a configuration's blocks of seeds are run: (policy, num_steps, tokenizer, one RunSettings per block) ->
# one `run_episodes` report per block, in the blocks' order. `local_blocks` here; `sim.cluster.RayBlocks`.
RunBlocks = Callable[[PolicyUnderTest, int, Path | None, list[RunSettings]], list[dict[str, Any]]]


def local_blocks(
    policy: PolicyUnderTest, num_steps: int, tokenizer: Path | None, runs: list[RunSettings]
) -> list[dict[str, Any]]:
    """Serve the configuration once on this machine and run each of `runs` in a process of its own
    (`worker`) against that server -> their reports."""
    daemon_for_config = serve(policy, num_steps, tokenizer)
    with tempfile.TemporaryDirectory(prefix="pi0-eval-") as tmp, daemon_for_config as daemon:
        workers = []
        for i, run in enumerate(runs):
            out = f"{tmp}/worker{i}.json"
            argv = [sys.executable, "-m", "sim.evaluate", daemon.endpoint, json.dumps(asdict(run)), out]
            output = open(f"{tmp}/worker{i}.log", "w")  # noqa: SIM115 (closed below, after the worker exits)
            workers.append((subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT), output, i))
        reports = []
        for process, output, i in workers:
            code = process.wait()
            output.close()
            report_path = Path(f"{tmp}/worker{i}.json")
            if code != 0 or not report_path.is_file():
                raise SimError(f"worker {i} exited with {code}:\n{Path(output.name).read_text()[-3000:]}")
            reports.append(json.loads(report_path.read_text()))
    return reports


def run_configuration(
    policy: PolicyUnderTest, num_steps: int, mode: str, settings: EvalSettings, guidance_scale: float | None = None,
    run_blocks: RunBlocks = local_blocks,
) -> dict[str, Any]:  # fmt: skip
    """One configuration: its seeds in `workers` blocks, run by `run_blocks` (local processes sharing one
    server, or Ray tasks each serving the policy: `sim.cluster`), their reports merged into its row."""
    if mode not in MODES:
        raise SimError(f"unknown mode {mode!r}; choose from {MODES}")
    start = time.perf_counter()
    seed_blocks = blocks(settings.seeds, settings.workers)
    runs = [worker_settings(settings, mode, block, guidance_scale) for block in seed_blocks]
    reports = run_blocks(policy, num_steps, settings.tokenizer, runs)
    episodes = [episode for report in reports for episode in report["episodes"]]
    metadata = reports[-1]["policy"]
    row = summary_row(policy, num_steps, mode, settings, episodes, metadata, time.perf_counter() - start)
    guidance = metadata.get("guidance")
    row["guidance_scale"] = (
        guidance_scale if guidance_scale is not None or guidance is None else guidance["default_scale"]
    )
    # where the episodes ran: the Ray nodes' addresses (a Ray task's report names its node), None locally
    row["ray_nodes"] = sorted({r["node"] for r in reports}) if all("node" in r for r in reports) else None
    return row


def episodes_through(endpoint: str, run: RunSettings) -> dict[str, Any]:
    """`run_episodes` with `run` through the server at `endpoint` -> its report: what a worker does, a local
    process (`worker`) or a Ray task (`sim.cluster.run_block`)."""
    with PolicyClient(endpoint, timeout_s=run.timeout) as client:
        return run_episodes(client, run, endpoint=endpoint)


def worker(argv: list[str]) -> int:
    """`python -m sim.evaluate ENDPOINT SETTINGS REPORT`: `run_episodes` with `RunSettings(**SETTINGS)`
    (JSON) through the server at ENDPOINT, the report written to REPORT; 2 when the server stopped answering."""
    endpoint, settings, out = argv
    report = episodes_through(endpoint, RunSettings(**json.loads(settings)))
    write_json(Path(out), report)
    return 2 if report["aborted"] else 0


def summary_row(
    policy: PolicyUnderTest, num_steps: int, mode: str, settings: EvalSettings, episodes: list[dict[str, Any]],
    metadata: dict[str, Any], wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    n, successes = len(episodes), sum(e["success"] for e in episodes)
    low, high = wilson_interval(successes, n)
    latency = summarize(x for e in episodes for x in e["latency_ms_each"])
    joins = combine_boundary_figures([e["at_chunk_boundaries"] for e in episodes])

    return {
        "policy": policy.name,
        "path": str(policy.path),
        "served_by": metadata.get("backend"),
        "served_num_steps": metadata.get("num_steps"),
        "precision": metadata.get("precision"),
        "num_steps": num_steps,
        "mode": mode,
        "delay": settings.delay if mode != "sync" else 0,
        "actions_per_chunk": settings.actions_per_chunk,
        "episodes": n,
        "successes": successes,
        "success_rate": successes / n if n else 0.0,
        "ci95": [low, high],
        "mean_return": float(np.mean([e["return"] for e in episodes])) if n else 0.0,
        "mean_max_reward": float(np.mean([e["max_reward"] for e in episodes])) if n else 0.0,
        "latency_p50_ms": latency.get("p50"),
        "stalls": sum(e["stalls"] for e in episodes),
        # smoothness where chunks join, over the episodes (`sim.harness.combine_boundary_figures`)
        "mean_plan_jump": joins.get("mean_plan_jump"),
        "mean_boundary_step": joins.get("mean_step"),
        "median_step_within_chunks": joins.get("median_step_within_chunks"),
        "errors": sum(e["error"] is not None for e in episodes),
        "wall_s": round(wall_s, 1),
        "seeds": [e["seed"] for e in episodes],
        "succeeded": [e["seed"] for e in episodes if e["success"]],
    }


def evaluate(
    settings: EvalSettings, progress: Callable[[dict[str, Any]], None] = lambda row: None
) -> list[dict[str, Any]]:
    """Every policy x steps x mode, one after the other (each fans out over `settings.workers` processes, or
    Ray tasks with `settings.ray`); the paths, the held-out seeds and the Ray cluster checked before anything
    is served."""
    if settings.episodes < 1 or settings.workers < 1:
        raise SimError(f"--episodes {settings.episodes}, --workers {settings.workers}: each must be at least 1")
    policies = [PolicyUnderTest.parse(p) for p in settings.policies]
    if settings.tokenizer is not None:
        existing_file(settings.tokenizer, "--tokenizer", "the bundles' SentencePiece model")
    if settings.demonstrations is not None:
        from sim.record import recorded_seeds

        used = recorded_seeds(settings.demonstrations)
        if overlap := sorted(used.intersection(settings.seeds)):
            raise SimError(f"seeds {overlap[:10]}... were used for the demonstrations in {settings.demonstrations}")
    seeds = settings.seeds
    with contextlib.ExitStack() as stack:
        run_blocks: RunBlocks = local_blocks
        if settings.ray is not None:
            from sim.cluster import connected

            run_blocks = stack.enter_context(connected(settings.ray))
        log.info(
            "%d configurations x %d episodes (seeds %d-%d), %d %s",
            len(policies) * len(settings.steps) * len(settings.modes) * max(1, len(settings.guidance)), len(seeds),
            seeds[0], seeds[-1], settings.workers, "workers" if settings.ray is None else "Ray tasks",
        )  # fmt: skip
        rows = []
        for policy in policies:
            for num_steps in settings.steps:
                for mode in settings.modes:
                    for scale in settings.guidance or (None,):
                        rows.append(run_configuration(policy, num_steps, mode, settings, scale, run_blocks))
                        progress(rows[-1])
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as the table docs/sim.md carries."""
    lines = [
        "| policy | served by | steps | chunks | guidance | success | 95% interval | mean return | latency p50 | plan jump |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        joining = "sync" if r["mode"] == "sync" else f"{r['mode']}, D={r['delay']}"
        latency = "-" if r["latency_p50_ms"] is None else f"{r['latency_p50_ms']:.1f} ms"
        jump = "-" if r["mean_plan_jump"] is None else f"{r['mean_plan_jump']:.3f}"
        lines.append(
            f"| {r['policy']} | {r['served_by']} ({r['precision']}) | {r['num_steps']} | {joining} "
            f"| {'-' if r.get('guidance_scale') is None else format(r['guidance_scale'], 'g')} "
            f"| {r['successes']}/{r['episodes']} ({100 * r['success_rate']:.0f}%) "
            f"| {100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}% | {r['mean_return']:.1f} "
            f"| {latency} | {jump} |"
        )
    return "\n".join(lines) + "\n"


def command(args: argparse.Namespace) -> int:
    """`pi0-sim eval`: `evaluate`, its rows as JSON (`--report`) and as the markdown table (printed, `--table`)."""
    settings = from_arguments(EvalSettings, args)

    def progress(row: dict[str, Any]) -> None:
        log.info(
            "%s, %d steps, %s: %d/%d (%.0f%%, 95%% %.0f-%.0f%%), mean return %.1f, latency p50 %.1f ms, %.0f s",
            row["policy"], row["num_steps"], row["mode"], row["successes"], row["episodes"],
            100 * row["success_rate"], 100 * row["ci95"][0], 100 * row["ci95"][1], row["mean_return"],
            row["latency_p50_ms"] or float("nan"), row["wall_s"],
        )  # fmt: skip

    rows = evaluate(settings, progress)
    seeds = settings.seeds
    write_json(args.report, {"held_out_seeds": [seeds[0], seeds[-1]], "configurations": rows})
    table = markdown_table(rows)
    if args.table is not None:
        args.table.write_text(table)
    print(table)
    return 0


def reference_serve_command(args: argparse.Namespace) -> int:
    """`pi0-sim reference-serve`: a checkpoint's PyTorch model (the exporter's reference engine) behind the
    daemon's own server."""
    from exporter.checkpoint import load_checkpoint
    from exporter.torch_backend import reference_engine
    from runtime.daemon.server import Server, ServerConfig

    existing_directory(args.checkpoint, "--checkpoint", what="a checkpoint")
    if args.tokenizer is not None:
        existing_file(args.tokenizer, "--tokenizer", "a SentencePiece model")
    config = ServerConfig(endpoint=bindable(args.endpoint), queue_size=args.queue_size)
    policy = load_checkpoint(args.checkpoint)
    server = Server(lambda: reference_engine(policy, args.tokenizer).with_num_steps(args.num_steps), config)
    return server.serve()


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_command(lambda: worker(sys.argv[1:]), log.error))

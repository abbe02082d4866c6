"""`pi0-sim eval --ray auto|ADDRESS`: each configuration's episodes as Ray tasks on a cluster, merged into
the same row, report and table as `--workers` processes (`sim.evaluate.run_configuration` merges both).

A task is one block of seeds (`--workers` contiguous blocks per configuration, as for local processes) and
serves the policy itself: `run_block` starts the very server the local path starts (`sim.evaluate.serve`:
`pi0-runtime serve --num-steps N` on a bundle, `pi0-sim reference-serve` on a checkpoint) on an ipc socket
of its own, on whichever node Ray placed it, runs `sim.harness.run_episodes` through it (what a local worker
runs, `sim.evaluate.episodes_through`), stops it and returns the report. Each episode's outcome follows from
its seed (the env's reset and every request's noise), and the server command is the same, so the same seeds
give the same episodes as `--workers`, however the seeds are cut into blocks.

A served policy per task, rather than one serving actor per node, because:
- a task holds nothing outside itself: Ray may place it on any node with a free CPU, and reruns it when its
  node or worker is lost (`max_retries`); a rerun repeats the same seeded episodes, so it cannot change a
  result. A serving actor per node would need its tasks pinned to its node, a lifetime per configuration
  (each configuration is another server) and its own restarts.
- the client reaches its server over an ipc socket on its own node: no TCP endpoint per node (which the
  daemon would want CURVE keys for), nothing but tasks and reports crosses the network.
- inference is not funnelled into one queue per node: with a real pi0 on CPUs a chunk takes seconds, and
  one server per node would make that node's episodes wait for each other's chunks.
The cost: a server start per task (loading the policy and its warm-up, seconds, against minutes for a
block of episodes with a real pi0; fewer, longer blocks amortize it: `--workers`) and a copy of the policy in
memory per running task. A node runs as many tasks at once as it has CPUs (each task claims one), so start
a node short of memory, or of cores for several servers, with fewer (`ray start --num-cpus K`).

Every node needs this project installed with its `sim` and `ray` extras (the same version), and the
policies' and tokenizer's paths must exist there (a shared filesystem, or copies at the same path). Ray is a
workstation and cluster dependency only: it is imported here, lazily, never by `runtime`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from sim.errors import SimError, existing_directory, existing_file
from sim.evaluate import PolicyUnderTest, episodes_through, serve
from sim.settings import RunSettings

log = logging.getLogger("pi0-sim")
INSTALL = "pip install -e '.[ray]' (ray==2.60.0, on every node too)"


def run_block(policy: PolicyUnderTest, num_steps: int, tokenizer: Path | None, run: RunSettings) -> dict[str, Any]:
    """One Ray task: serve `policy` at `num_steps` on this node, run `run`'s episodes through it -> the
    report, with `node` (this node's Ray id) added."""
    import ray

    here = f"not on {socket.gethostname()}, a Ray node: every node needs it at the same path"
    existing_directory(policy.path, "--policy", what=f"a bundle or a checkpoint; {here}")
    if tokenizer is not None:
        existing_file(tokenizer, "--tokenizer", here)
    with serve(policy, num_steps, tokenizer) as daemon:
        report = episodes_through(daemon.endpoint, run)
    return {**report, "node": ray.get_runtime_context().get_node_id()}


class RayBlocks:
    """`sim.evaluate.RunBlocks` on a Ray cluster (connected: `connected`): one task per block, its report
    back, its `node` the address of the node it ran on."""

    def __init__(self) -> None:
        import ray

        self.task = ray.remote(num_cpus=1)(run_block)

    def __call__(
        self, policy: PolicyUnderTest, num_steps: int, tokenizer: Path | None, runs: list[RunSettings]
    ) -> list[dict[str, Any]]:
        import ray

        # absolute paths: a task's working directory is not the driver's
        there = replace(policy, path=policy.path.resolve())
        tokenizer = tokenizer.resolve() if tokenizer is not None else None
        futures = [self.task.remote(there, num_steps, tokenizer, run) for run in runs]
        # On an error the other tasks are left to `connected`'s disconnect, which ends them (their servers
        # stopped on the way out); `ray.cancel` of a task that has just finished can abort Ray's own process.
        reports, addresses = [], node_addresses()
        for run, future in zip(runs, futures, strict=True):
            seeds = f"seeds {run.seed}-{run.seed + run.episodes - 1}"
            try:
                report = ray.get(future)
            except ray.exceptions.RayTaskError as e:  # the task raised: its own error, not Ray's wrapping
                raise SimError(f"the Ray task of {seeds} failed: {e.cause or e}") from e
            except ray.exceptions.RayError as e:  # lost: its node or worker died past its retries
                raise SimError(f"the Ray task of {seeds} did not finish: {str(e).strip().splitlines()[0]}") from e
            if report["node"] not in addresses:  # a node that joined after the tasks were sent
                addresses = node_addresses()
            node = addresses.get(report["node"], report["node"])
            if report["aborted"]:
                raise SimError(f"the Ray task of {seeds} on {node}: run aborted, {report['aborted']}")
            reports.append({**report, "node": node})
        return reports


def node_addresses() -> dict[str, str]:
    """The cluster's nodes (those it has known, alive or not): Ray id -> address."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


def reachable(address: str) -> None:
    """A SimError unless something answers at `address` (HOST:PORT, or for `auto` what RAY_ADDRESS names;
    `auto` without it, and `ray://`, are Ray's to find): `ray.init` would otherwise retry an address where
    nothing listens for minutes."""
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if not target or "://" in target:
        return
    flag = f"--ray {address}" + (f" (RAY_ADDRESS {target})" if target != address else "")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SimError(f"{flag}: expected auto or the head's HOST:PORT (what `ray start --head` prints)")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise SimError(f"{flag}: no Ray cluster answers there ({e.strerror or e})") from e


@contextlib.contextmanager
def connected(address: str) -> Iterator[RayBlocks]:
    """This process connected to the Ray cluster at `address` (`auto` or HOST:PORT) for as long as the
    `with` lasts -> the blocks' runner; a SimError when Ray is not installed or no cluster is there."""
    try:
        import ray
    except ImportError as e:
        raise SimError(f"--ray {address}: Ray is not installed; it is a workstation extra: {INSTALL}") from e
    reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError) as e:
        raise SimError(f"--ray {address}: {str(e).strip().splitlines()[0]}") from e
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = int(ray.cluster_resources().get("CPU", 0))
        names = ", ".join(sorted(n["NodeManagerAddress"] for n in nodes))
        log.info("Ray cluster at %s: %d CPUs on %s", address, cpus, names)
        yield RayBlocks()
    finally:
        ray.shutdown()

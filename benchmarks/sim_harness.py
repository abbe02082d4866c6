"""The MuJoCo harness: the scripted oracle through the whole path (oracle server + ZeroMQ + the harness's
`run_episodes`, what `pi0-sim run` runs) on transfer-cube seeds 0..19 (target: at least 19 successes); gym-aloha's per-step time with and
without rendering only the camera the policy sees; open-loop parity of a whole recorded episode through
the daemon against the PyTorch reference, for fp32 and fp16 bundles of the aloha-sim fixture.
`--smoke`: every part once on a few steps, to see that it runs (no figures; nothing is written)."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.tokenizer_train import train_tokenizer
from pi0_client.client import PolicyClient
from sim.cli import main as pi0_sim
from sim.harness import run_episodes
from sim.oracle import oracle_daemon
from sim.settings import RunSettings
from sim.video import EpisodeVideo

ROOT = Path(__file__).resolve().parents[1]
ALOHA_FIXTURE = ROOT / "tests" / "fixtures" / "lerobot-pi0-tiny-aloha-sim" / "checkpoint"
PARITY_PROMPT = "transfer cube"  # fits the fixture's 12-token budget with a 320-piece tokenizer
# --smoke: every part once, a few steps each (seconds; what a test runs to see the benchmark still works)
SMOKE = {"episodes": 1, "max_steps": 10, "parity_steps": 2, "precisions": ("fp32",)}


def pi0_sim_json(argv: list[str], out: Path) -> dict:
    code = pi0_sim([*argv, "--report", str(out)])
    if code != 0:
        raise RuntimeError(f"pi0-sim {' '.join(argv)} exited {code}")
    return json.loads(out.read_text())


def drive(endpoint: str, settings: RunSettings, video: Path | None = None) -> dict:
    """`run_episodes` through the server at `endpoint` (what `pi0-sim run --endpoint` does), its report."""
    with PolicyClient(endpoint, timeout_s=settings.timeout) as client, contextlib.ExitStack() as stack:
        watcher = stack.enter_context(EpisodeVideo(video)) if video is not None else None
        return run_episodes(client, settings, endpoint=endpoint, watcher=watcher)


def parity(tmp: Path, max_steps: int | None = None, precisions: tuple[str, ...] = ("fp32", "fp16")) -> dict:
    record = ["record", "--out", str(tmp / "episodes"), "--seed", "0", "--prompt", PARITY_PROMPT]
    if pi0_sim(record + ([] if max_steps is None else ["--max-steps", str(max_steps)])) != 0:
        raise RuntimeError("pi0-sim record failed")
    tokenizer = train_tokenizer(tmp / "tokenizer.model", vocab_size=320)
    results = {}
    for precision in precisions:
        bundle = tmp / f"bundle-{precision}"
        options = BundleOptions(precision=precision, tokenizer=tokenizer)
        build_bundle(load_checkpoint(ALOHA_FIXTURE), bundle, options, log=lambda message: None)
        argv = ["parity", "--bundle", str(bundle), "--checkpoint", str(ALOHA_FIXTURE)]
        argv += ["--episode", str(tmp / "episodes" / "episode_000000")]
        results[precision] = pi0_sim_json(argv, tmp / f"parity-{precision}.json")
    return results


def run(
    episodes: int = 20, max_steps: int | None = None, parity_steps: int | None = None,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
) -> dict:  # fmt: skip
    """The oracle on seeds 0..episodes-1, one oracle episode (seed 0) three ways for the per-step time,
    open-loop parity per precision; `max_steps` and `parity_steps` cut the episodes (for --smoke)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = RunSettings(seed=0, max_steps=max_steps)
        with oracle_daemon() as oracle:
            harness = drive(oracle.endpoint, RunSettings(seed=0, episodes=episodes, max_steps=max_steps))
            reports = {  # a video makes every step's frame wanted (the closed loop alone renders only for requests)
                "top camera only": drive(oracle.endpoint, one, tmp / "fix.mp4"),
                "top camera, rendered only for requests (the loop's default)": drive(oracle.endpoint, one),
                "three cameras (gym-aloha as shipped)": drive(oracle.endpoint, replace(one, render_fix=False)),
            }
        render = {name: report["sim_step_ms"] for name, report in reports.items()}
        return {"oracle": harness, "render": render, "parity": parity(tmp, parity_steps, precisions)}


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(sim: dict) -> list[str]:
    from benchmarks.render import table  # here: `python benchmarks/sim_harness.py` has no `benchmarks` package

    oracle, render, parity = sim["oracle"], sim["render"], sim["parity"]
    steps = [e["steps"] for e in oracle["episodes"]]
    return [
        "## The MuJoCo harness (`benchmarks/sim_harness.py`)",
        "The scripted oracle (`pi0-sim oracle-serve`, the runtime's own server) driven by `pi0-sim run` over "
        f"ZeroMQ ipc on gym-aloha transfer-cube, seeds 0..{len(steps) - 1}, whole chunks (50 actions) per "
        "request, EGL rendering (Mesa, CPU). Target: at least 19 successes of 20.",
        table(
            [
                ("successes", f"{oracle['successes']} / {len(steps)}"),
                ("max reward per episode", ", ".join(f"{e['max_reward']:.0f}" for e in oracle["episodes"])),
                ("steps to success (min / mean / max)", f"{min(steps)} / {sum(steps) / len(steps):.0f} / {max(steps)}"),
                (
                    "request round trip p50 / p99 (ms; the plan is made at the first)",
                    f"{oracle['latency_ms']['p50']:.2f} / {oracle['latency_ms']['p99']:.1f}",
                ),
                ("errors", oracle["errors"]),
            ]
        ),
        "gym-aloha's `env.step` (physics and rendering) per step, one oracle episode (seed 0), with the "
        "render fix (only the `top` camera the policy sees, every step), with the frame rendered only when a "
        "request needs it (`TopCamera.lazy`; the render then happens outside `env.step`, once per request), "
        "and as shipped (three 480x640 cameras).",
        "| ms per step | p50 | p90 | p99 | steps |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {v['p50']:.1f} | {v['p90']:.1f} | {v['p99']:.1f} | {v['n']} |" for name, v in render.items()
        ),
        "Open-loop parity (`pi0-sim parity`): one recorded oracle episode (seed 0), every step, through the "
        "PyTorch reference and through the daemon serving a bundle of the `lerobot-pi0-tiny-aloha-sim` "
        "fixture (1 camera + 2 empty slots, ALOHA conventions), same noise; action chunks in the robot's "
        "units. Threshold: fp32 max abs <= 1e-4; fp16 cosine >= 0.999 and mean abs <= 1e-2.",
        "| bundle | steps | max abs | mean abs | cosine | worst step cosine | passed |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {precision} | {r['steps_compared']} | {r['overall']['max_abs']:.3g} | {r['overall']['mean_abs']:.3g} "
            f"| {r['overall']['cosine']:.8f} | {r['overall']['cosine_worst_step']:.8f} | {r['passed']} |"
            for precision, r in parity.items()
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every part once, a few steps each: seconds, no figures")
    args = parser.parse_args()
    result = (
        run(SMOKE["episodes"], SMOKE["max_steps"], SMOKE["parity_steps"], SMOKE["precisions"]) if args.smoke else run()
    )
    print(json.dumps(result, indent=2))

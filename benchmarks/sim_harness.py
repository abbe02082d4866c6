"""The MuJoCo harness: the scripted oracle through the whole path (oracle server + ZeroMQ + `pi0-sim
run`) on transfer-cube seeds 0..19 (target: at least 19 successes); gym-aloha's per-step time with and
without rendering only the camera the policy sees; open-loop parity of a whole recorded episode through
the daemon against the PyTorch reference, for fp32 and fp16 bundles of the aloha-sim fixture."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.render import table
from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.tokenizer_train import train_tokenizer
from sim.cli import main as pi0_sim
from sim.oracle import oracle_daemon

ROOT = Path(__file__).resolve().parents[1]
ALOHA_FIXTURE = ROOT / "tests" / "fixtures" / "lerobot-pi0-tiny-aloha-sim" / "checkpoint"
PARITY_PROMPT = "transfer cube"  # fits the fixture's 12-token budget with a 320-piece tokenizer


def pi0_sim_json(argv: list[str], out: Path) -> dict:
    code = pi0_sim([*argv, "--report", str(out)])
    if code != 0:
        raise RuntimeError(f"pi0-sim {' '.join(argv)} exited {code}")
    return json.loads(out.read_text())


def parity(tmp: Path) -> dict:
    if pi0_sim(["record", "--out", str(tmp / "episodes"), "--seed", "0", "--prompt", PARITY_PROMPT]) != 0:
        raise RuntimeError("pi0-sim record failed")
    tokenizer = train_tokenizer(tmp / "tokenizer.model", vocab_size=320)
    results = {}
    for precision in ("fp32", "fp16"):
        bundle = tmp / f"bundle-{precision}"
        options = BundleOptions(precision=precision, tokenizer=tokenizer)
        build_bundle(load_checkpoint(ALOHA_FIXTURE), bundle, options, log=lambda message: None)
        argv = ["parity", "--bundle", str(bundle), "--checkpoint", str(ALOHA_FIXTURE)]
        argv += ["--episode", str(tmp / "episodes" / "episode_000000")]
        results[precision] = pi0_sim_json(argv, tmp / f"parity-{precision}.json")
    return results


def run(episodes: int = 20) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with oracle_daemon() as oracle:
            run_argv = ["run", "--endpoint", oracle.endpoint, "--seed", "0"]
            harness = pi0_sim_json([*run_argv, "--episodes", str(episodes)], tmp / "harness.json")
            render = {  # --video makes every step's frame wanted (the closed loop alone renders only for requests)
                "top camera only": pi0_sim_json([*run_argv, "--video", str(tmp / "fix.mp4")], tmp / "fix.json")[
                    "sim_step_ms"
                ],
                "top camera, rendered only for requests (the loop's default)": pi0_sim_json(
                    run_argv, tmp / "lazy.json"
                )["sim_step_ms"],
                "three cameras (gym-aloha as shipped)": pi0_sim_json(
                    [*run_argv, "--no-render-fix"], tmp / "shipped.json"
                )["sim_step_ms"],
            }
        return {"oracle": harness, "render": render, "parity": parity(tmp)}


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def sections(sim: dict) -> list[str]:
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
    print(json.dumps(run(), indent=2))

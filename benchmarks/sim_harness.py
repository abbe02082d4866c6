"""The MuJoCo harness: the scripted oracle through the whole path (oracle server + ZeroMQ + `pi0-sim
run`) on transfer-cube seeds 0..19 (target: at least 19 successes); gym-aloha's per-step time with and
without rendering only the camera the policy sees; open-loop parity of a whole recorded episode through
the daemon against the PyTorch reference, for fp32 and fp16 bundles of the aloha-sim fixture."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from exporter.bundle import BundleOptions, build_bundle
from exporter.checkpoint import load_checkpoint
from exporter.tokenizer_train import train_tokenizer
from sim.cli import main as pi0_sim
from sim.daemon import PolicyService

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
        with PolicyService.oracle() as oracle:
            run_argv = ["run", "--endpoint", oracle.endpoint, "--seed", "0"]
            harness = pi0_sim_json([*run_argv, "--episodes", str(episodes)], tmp / "harness.json")
            render = {
                "top camera only": pi0_sim_json(run_argv, tmp / "fix.json")["sim_step_ms"],
                "three cameras (gym-aloha as shipped)": pi0_sim_json(
                    [*run_argv, "--no-render-fix"], tmp / "shipped.json"
                )["sim_step_ms"],
            }
        return {"oracle": harness, "render": render, "parity": parity(tmp)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))

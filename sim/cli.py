"""`pi0-sim`: gym-aloha in MuJoCo driven through the policy server's client.

pi0-sim run --endpoint tcp://127.0.0.1:5555 --episodes 20 --report report.json
pi0-sim run --bundle build/demo/bundle --max-steps 100        (starts and stops the daemon itself)
pi0-sim oracle-serve --endpoint tcp://127.0.0.1:5556          (the scripted expert, same protocol)
pi0-sim record --episodes 2 --out episodes/
pi0-sim stats episodes/                                       (normalization statistics of recordings)
pi0-sim train episodes/ --out trained/ --steps 3000           (a pi0 by flow matching; a LeRobot checkpoint)
pi0-sim parity --bundle B --checkpoint C --episode episodes/episode_000000
pi0-sim eval --policy fp32=B32 --policy fp16=B16 --steps 10 5 3 --modes sync rtc --episodes 50
pi0-sim eval --policy B --episodes 2000 --ray auto --workers 64     (episodes as Ray tasks on a cluster)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from devtools.supervise import DaemonError
from exporter.source import add_source_arguments
from pi0_client.client import PolicyError
from runtime.errors import run_command
from sim.env import DEFAULT_TASK
from sim.errors import SimError
from sim.harness import setup_logging
from sim.settings import EvalSettings, RunSettings, TrainSettings, add_arguments

log = logging.getLogger("pi0-sim")
RECORD_SETTINGS = ("task", "prompt", "seed", "episodes", "max_steps", "actions_per_chunk", "timeout")


def build_parser() -> argparse.ArgumentParser:
    """Each command's flags: its settings dataclass's (`sim.settings`) and its paths; its handler, named
    `module:function`, is imported only when the command runs (training brings torch)."""
    parser = argparse.ArgumentParser(
        prog="pi0-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="closed-loop episodes through a policy server; success rate and latency")
    target = run.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", help="a running server: the daemon or `pi0-sim oracle-serve`")
    target.add_argument(
        "--bundle", type=Path, help="start `pi0-runtime serve` on this bundle for the run, then stop it"
    )
    target.add_argument(
        "--openpi", metavar="HOST:PORT",
        help="a daemon's openpi websocket endpoint, driven by openpi-client's own WebsocketClientPolicy and "
        "ActionChunkBroker (pip install openpi-client), as openpi's robot code drives it",
    )  # fmt: skip
    run.add_argument("--backend", help="the daemon's backend with --bundle (default: its own choice)")
    add_arguments(run, RunSettings)
    run.add_argument(
        "--video", type=Path, metavar="OUT.mp4", help="write the episodes as seen, with step/reward/latency"
    )
    run.add_argument("--report", type=Path, metavar="REPORT.json", help="write the full report here")
    run.add_argument("--min-success-rate", type=float, help="exit 1 when the success rate is below this")
    run.set_defaults(handler="sim.harness:command")

    oracle = commands.add_parser(
        "oracle-serve", help="serve the scripted transfer-cube expert over the daemon's protocol"
    )
    oracle.add_argument(
        "--endpoint", default="tcp://127.0.0.1:5555", help="where to bind (default tcp://127.0.0.1:5555)"
    )
    oracle.add_argument("--task", default=DEFAULT_TASK, choices=[DEFAULT_TASK])
    oracle.add_argument("--chunk-size", type=int, default=50, help="actions per reply (default 50, as pi0)")
    oracle.add_argument("--queue-size", type=int, default=4)
    oracle.set_defaults(handler="sim.oracle:serve_command")

    reference = commands.add_parser(
        "reference-serve",
        help="serve a checkpoint's PyTorch model (the exporter's reference) over the daemon's protocol",
    )
    reference.add_argument("--checkpoint", type=Path, required=True)
    reference.add_argument("--tokenizer", type=Path, help="SentencePiece model for the prompt (the bundle's)")
    reference.add_argument("--num-steps", type=int, help="flow-matching steps per chunk (default: the checkpoint's)")
    reference.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="default tcp://127.0.0.1:5557")
    reference.add_argument("--queue-size", type=int, default=4)
    reference.set_defaults(handler="sim.evaluate:reference_serve_command")

    evaluation = commands.add_parser(
        "eval",
        help="success rates over held-out seeds: policies x denoising steps x chunk joining, episodes in parallel",
        description="Each configuration is served once (a bundle by pi0-runtime serve --num-steps N, a checkpoint "
        "by its PyTorch reference behind the same server) and --workers processes share it, each running a block "
        "of the seeds; with --ray, --workers Ray tasks on a cluster run the blocks, each serving the policy itself. "
        "Per configuration: success rate with a 95% Wilson interval, mean episode return, latency p50.",
    )
    add_arguments(evaluation, EvalSettings)
    evaluation.add_argument("--report", type=Path, metavar="EVAL.json", help="every configuration's figures")
    evaluation.add_argument("--table", type=Path, metavar="TABLE.md", help="the markdown table")
    evaluation.set_defaults(handler="sim.evaluate:command")

    record = commands.add_parser("record", help="save scripted demonstrations (frames, states, actions, prompt)")
    record.add_argument("--out", type=Path, required=True, help="directory for episode_000000/, episode_000001/, ...")
    record.add_argument("--endpoint", help="record a policy server's episodes instead of the in-process oracle")
    add_arguments(record, RunSettings, only=RECORD_SETTINGS)
    record.set_defaults(handler="sim.record:record_command")

    stats = commands.add_parser(
        "stats", help="normalization statistics of recorded episodes, in pi0's ALOHA space (state and action)"
    )
    stats.add_argument("episodes", type=Path, help="a directory written by `pi0-sim record`")
    stats.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    stats.set_defaults(handler="sim.record:stats_command")

    training = commands.add_parser(
        "train",
        help="train a pi0-architecture policy by flow matching on recorded episodes; writes a LeRobot checkpoint",
        description="Train a pi0-architecture policy (our model code, a preset sized for a CPU) by flow matching on "
        "`pi0-sim record` episodes, and write OUT/checkpoint/ (LeRobot v0.3: config, weights, statistics) and "
        "OUT/tokenizer.model, ready for `pi0-export bundle`. Seeded, resumable (--resume), progress every 50 steps.",
    )
    training.add_argument(
        "episodes", type=Path, nargs="+", help="directories written by `pi0-sim record` (demonstrations, rollouts)"
    )
    training.add_argument("--out", type=Path, required=True, help="output directory (checkpoint, state, losses)")
    training.add_argument(
        "--tokenizer", type=Path, help="SentencePiece model (default: train the project's own into OUT)"
    )
    add_arguments(training, TrainSettings)
    training.add_argument("--resume", action="store_true", help="continue from OUT/train_state.{safetensors,json}")
    training.set_defaults(handler="sim.train:command")

    parity = commands.add_parser("parity", help="a recorded episode through the PyTorch reference and the daemon")
    parity.add_argument("--bundle", type=Path, required=True)
    parity.add_argument("--episode", type=Path, required=True, help="a directory written by `pi0-sim record`")
    parity.add_argument("--endpoint", help="a daemon already serving the bundle (default: start one)")
    parity.add_argument("--backend", help="the daemon's backend when it is started here")
    parity.add_argument("--noise-seed", type=int, default=0, help="seed of the noise both sides get (default 0)")
    parity.add_argument("--stride", type=int, default=1, help="compare every Nth step (default 1)")
    parity.add_argument("--max-steps", type=int, help="compare at most this many steps")
    parity.add_argument("--timeout", type=float, default=60.0)
    parity.add_argument("--report", type=Path, metavar="REPORT.json")
    add_source_arguments(parity)
    parity.set_defaults(handler="sim.parity:command")
    return parser


def handler_of(args: argparse.Namespace) -> Callable[[], int]:
    """The command's handler on `args`, the errors of the daemon's supervisor and of the client's own wheel
    (which knows nothing of `ApplianceError`) turned into `SimError`s."""
    module, _, name = args.handler.partition(":")
    handler = getattr(importlib.import_module(module), name)

    def command() -> int:
        try:
            return handler(args)
        except (DaemonError, PolicyError) as e:
            raise SimError(str(e)) from e

    return command


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 1 a check failed (`--min-success-rate`, parity), 2 a mistake (one line says which)."""
    setup_logging()
    args = build_parser().parse_args(argv)
    return run_command(handler_of(args), log.error)


if __name__ == "__main__":
    sys.exit(main())

"""`pi0-sim`: gym-aloha in MuJoCo driven through the policy server's client.

pi0-sim run --endpoint tcp://127.0.0.1:5555 --episodes 20 --report report.json
pi0-sim run --bundle build/demo/bundle --max-steps 100        (starts and stops the daemon itself)
pi0-sim oracle-serve --endpoint tcp://127.0.0.1:5556          (the scripted expert, same protocol)
pi0-sim record --episodes 2 --out episodes/
pi0-sim stats episodes/                                       (normalization statistics of recordings)
pi0-sim train episodes/ --out trained/ --steps 3000           (a pi0 by flow matching; a LeRobot checkpoint)
pi0-sim parity --bundle B --checkpoint C --episode episodes/episode_000000
pi0-sim eval --policy fp32=B32 --policy fp16=B16 --steps 10 5 3 --modes sync rtc --episodes 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pi0_client.client import PolicyClient, PolicyError, ServerUnavailableError
from pi0_client.metadata import Metadata
from runtime.supervise import Daemon, DaemonError
from sim.env import STATE_DIM, TASKS, SimError, make_env, task_named

log = logging.getLogger("pi0-sim")
DEFAULT_TASK = "AlohaTransferCube-v0"


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        log.info("wrote %s", path)


def episode_settings(args: argparse.Namespace, metadata: Metadata, prompt: str) -> dict[str, Any]:
    """`run_episode`'s settings from the command line, once the policy's metadata shows it is an ALOHA policy."""
    for name in ("state_dim", "action_dim"):
        if getattr(metadata, name) != STATE_DIM:
            raise SimError(f"the policy's {name} is {getattr(metadata, name)}; gym-aloha's ALOHA has {STATE_DIM}")
    per_chunk = args.actions_per_chunk or metadata.chunk_size
    if not 1 <= per_chunk <= metadata.chunk_size:
        raise SimError(f"--actions-per-chunk {per_chunk}: the policy's chunks hold {metadata.chunk_size}")
    delay, rtc = getattr(args, "delay", 0), getattr(args, "rtc", False)  # `record` drives without them
    if rtc and not delay:
        raise SimError("--rtc needs --delay D (the control steps an inference is taken to last)")
    return {
        "prompt": prompt,
        "cameras": list(metadata.cameras),
        "actions_per_chunk": per_chunk,
        "max_steps": args.max_steps,
        "delay": delay,
        "rtc": rtc,
    }


def bundle_daemon(args: argparse.Namespace) -> Daemon:
    """`pi0-runtime serve` on `--bundle`, with `--backend` when given."""
    return Daemon.serve(args.bundle, *(["--backend", args.backend] if args.backend else []))


def cmd_run(args: argparse.Namespace) -> int:
    from sim.harness import report, run_episode
    from sim.video import EpisodeVideo

    task = task_named(args.task)
    prompt = args.prompt or task.prompt
    with contextlib.ExitStack() as stack:
        endpoint = args.endpoint
        if args.bundle is not None:
            log.info("starting the daemon on %s ...", args.bundle)
            endpoint = stack.enter_context(bundle_daemon(args)).endpoint
        if args.openpi:
            from sim.openpi import OpenpiClientPolicy

            if args.delay or args.rtc:
                raise SimError("--delay/--rtc drive our client; openpi's broker asks only when its chunk is used up")
            client = OpenpiClientPolicy(args.openpi, args.actions_per_chunk)
            endpoint = f"ws://{args.openpi}"
        else:
            client = stack.enter_context(PolicyClient(endpoint, timeout_s=args.timeout))
        metadata = client.metadata()
        settings = episode_settings(args, metadata, prompt)
        if args.openpi:  # openpi's broker hands out one action per call and asks every `actions_per_chunk`
            settings["actions_per_chunk"] = 1
        per_chunk = settings["actions_per_chunk"]
        log.info(
            "policy %s (%s); %s, %d actions per chunk",
            metadata.source,
            metadata.backend,
            task.name,
            per_chunk,
        )
        env = make_env(task, render_fix=not args.no_render_fix)
        video = stack.enter_context(EpisodeVideo(args.video)) if args.video else None
        results, aborted = [], None
        for i, seed in enumerate(range(args.seed, args.seed + args.episodes)):
            if video is not None:
                video.new_episode(seed)
            client.reset()  # a broker's leftover actions belong to the last episode
            start = time.perf_counter()
            try:
                result = run_episode(env, client, seed=seed, on_step=video, **settings)
            except ServerUnavailableError as e:
                aborted = f"episode {i + 1} (seed {seed}): {e}"
                log.error("run aborted, %s", aborted)
                break
            results.append(result)
            if result.error:
                log.warning("episode %d (seed %d) stopped early: %s", i + 1, seed, result.error)
            latency = result.summary()["latency_ms"]
            log.info(
                "episode %d/%d (seed %d): %s, max reward %.0f, %d steps, %d requests, latency p50 %.1f ms, %.1f s",
                i + 1,
                args.episodes,
                seed,
                "success" if result.success else "no success",
                result.max_reward,
                result.steps,
                result.requests,
                latency.get("p50", float("nan")),
                time.perf_counter() - start,
            )
        env.close()
        summary = report(
            results,
            task=task.name,
            prompt=prompt,
            endpoint=endpoint,
            actions_per_chunk=per_chunk,
            render_fix=not args.no_render_fix,
            policy=metadata.to_dict(),
            aborted=aborted,
        )
    write_json(args.report, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("episodes", "policy")}, indent=2))
    if aborted:
        return 2
    if args.min_success_rate is not None and summary["success_rate"] < args.min_success_rate:
        log.error("success rate %.2f is below --min-success-rate %.2f", summary["success_rate"], args.min_success_rate)
        return 1
    return 0


def cmd_oracle_serve(args: argparse.Namespace) -> int:
    from runtime.server import Server, ServerConfig
    from sim.oracle import TransferCubeOracle

    if args.task != DEFAULT_TASK:
        raise SimError(f"the scripted oracle exists for {DEFAULT_TASK} only")
    make_env(task_named(args.task)).close()  # choose the GL backend and fail early if gym-aloha is missing
    server = Server(
        lambda: TransferCubeOracle(chunk_size=args.chunk_size),
        ServerConfig(endpoint=args.endpoint, queue_size=args.queue_size, warm_up=False),
    )
    return server.serve()


def cmd_reference_serve(args: argparse.Namespace) -> int:
    from exporter.checkpoint import load_checkpoint
    from exporter.torch_backend import reference_engine
    from runtime.server import Server, ServerConfig

    policy = load_checkpoint(args.checkpoint)
    server = Server(
        lambda: reference_engine(policy, args.tokenizer).with_num_steps(args.num_steps),
        ServerConfig(endpoint=args.endpoint, queue_size=args.queue_size),
    )
    return server.serve()


def cmd_eval(args: argparse.Namespace) -> int:
    from sim.evaluate import PolicyUnderTest, Settings, evaluate, markdown_table

    policies = [PolicyUnderTest.parse(p) for p in args.policy]
    held_out = range(args.seed, args.seed + args.episodes)
    if args.demonstrations is not None:
        from sim.record import recorded_seeds

        used = recorded_seeds(args.demonstrations)
        if overlap := sorted(used.intersection(held_out)):
            raise SimError(f"seeds {overlap[:10]}... were used for the demonstrations in {args.demonstrations}")
    settings = Settings(
        seeds=tuple(held_out), workers=args.workers, actions_per_chunk=args.actions_per_chunk, delay=args.delay,
        max_steps=args.max_steps, prompt=args.prompt, tokenizer=args.tokenizer,
    )  # fmt: skip
    total = len(policies) * len(args.steps) * len(args.modes)
    log.info("%d configurations x %d episodes (seeds %d-%d), %d workers", total, args.episodes, held_out[0],
             held_out[-1], args.workers)  # fmt: skip

    def progress(row: dict[str, Any]) -> None:
        log.info(
            "%s, %d steps, %s: %d/%d (%.0f%%, 95%% %.0f-%.0f%%), mean return %.1f, latency p50 %.1f ms, %.0f s",
            row["policy"], row["num_steps"], row["mode"], row["successes"], row["episodes"],
            100 * row["success_rate"], 100 * row["ci95"][0], 100 * row["ci95"][1], row["mean_return"],
            row["latency_p50_ms"] or float("nan"), row["wall_s"],
        )  # fmt: skip

    rows = evaluate(policies, args.steps, args.modes, settings, progress)
    write_json(args.report, {"held_out_seeds": [held_out[0], held_out[-1]], "configurations": rows})
    table = markdown_table(rows)
    if args.table is not None:
        args.table.write_text(table)
    print(table)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from sim.harness import LocalPolicy, run_episode
    from sim.oracle import TransferCubeOracle
    from sim.record import EpisodeRecorder

    task = task_named(args.task)
    prompt = args.prompt or task.prompt
    env = make_env(task)
    with contextlib.ExitStack() as stack:
        if args.endpoint:
            policy: Any = stack.enter_context(PolicyClient(args.endpoint, timeout_s=args.timeout))
            source = f"server:{args.endpoint}"
        else:
            if task.name != DEFAULT_TASK:
                raise SimError(
                    f"the scripted oracle exists for {DEFAULT_TASK} only; give --endpoint to record a policy"
                )
            policy = LocalPolicy(TransferCubeOracle())
            source = "oracle:transfer_cube"
        settings = episode_settings(args, policy.metadata(), prompt)
        for i, seed in enumerate(range(args.seed, args.seed + args.episodes)):
            recorder = EpisodeRecorder()
            result = run_episode(env, policy, seed=seed, on_step=recorder, **settings)
            directory = recorder.save(
                args.out / f"episode_{i:06d}", result, task=task.name, prompt=prompt, source=source
            )
            log.info(
                "episode %d/%d (seed %d): %s, %d steps -> %s",
                i + 1,
                args.episodes,
                seed,
                "success" if result.success else "no success",
                result.steps,
                directory,
            )
    env.close()
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from exporter.source import load_source
    from exporter.torch_backend import reference_engine
    from runtime.bundle import load_bundle
    from runtime.engine import Prompts
    from sim.parity import open_loop_parity
    from sim.record import load_episode

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
        endpoint = args.endpoint or stack.enter_context(bundle_daemon(args)).endpoint
        client = stack.enter_context(PolicyClient(endpoint, timeout_s=args.timeout))
        result = open_loop_parity(
            episode,
            reference,
            Prompts.from_bundle(bundle),
            client,
            precision=bundle.precision,
            seed=args.noise_seed,
            stride=args.stride,
            max_steps=args.max_steps,
            progress=progress,
        )
    result["bundle"] = str(args.bundle)
    write_json(args.report, result)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k in ("steps_compared", "overall", "thresholds", "passed")}, indent=2
        )
    )
    if not result["passed"]:
        log.error("parity failed: %s outside %s", result["overall"], result["thresholds"])
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from exporter.tokenizer_train import train_tokenizer
    from sim.train import TrainSettings, train

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or train_tokenizer(args.out / "tokenizer.model")
    given = {
        k: getattr(args, k) for k in ("preset", "steps", "batch_size", "lr", "seed", "frame_stride", "snapshot_every")
    }
    settings = TrainSettings(**{k: v for k, v in given.items() if v is not None})
    train(args.episodes, args.out, tokenizer, settings, resume=args.resume, log=log.info)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from sim.record import aloha_norm_stats, load_episode

    directories = sorted(d for d in args.episodes.iterdir() if (d / "meta.json").is_file())
    stats = aloha_norm_stats([load_episode(d) for d in directories])
    write_json(args.out, stats)
    if args.out is None:
        print(json.dumps(stats, indent=2))
    return 0


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS), help=f"default {DEFAULT_TASK}")
    parser.add_argument("--prompt", help="the instruction sent with every request (default: the task's LeRobot prompt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode; episode i uses seed + i")
    parser.add_argument("--max-steps", type=int, help="stop an episode after this many steps (default: the env's 300)")
    parser.add_argument(
        "--actions-per-chunk", type=int, metavar="K", help="execute the first K actions of each chunk (default: all)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply before retrying")


def build_parser() -> argparse.ArgumentParser:
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
        "--openpi",
        metavar="HOST:PORT",
        help="a daemon's openpi websocket endpoint, driven by openpi-client's own WebsocketClientPolicy and "
        "ActionChunkBroker (pip install openpi-client), as openpi's robot code drives it",
    )
    run.add_argument("--backend", help="the daemon's backend with --bundle (default: its own choice)")
    add_task_arguments(run)
    run.add_argument("--episodes", type=int, default=1, help="how many episodes (default 1)")
    run.add_argument(
        "--delay",
        type=int,
        default=0,
        metavar="D",
        help="take each inference to last D control steps (50 Hz): the next chunk is asked for D steps before the "
        "current one runs out and takes over at its index D; requests slower than that are counted as stalls",
    )
    run.add_argument(
        "--rtc",
        action="store_true",
        help="real-time chunking (with --delay): send the current chunk's remaining actions, so the next chunk "
        "joins it without a jump; the report has the action step and jerk at chunk boundaries",
    )
    run.add_argument(
        "--video", type=Path, metavar="OUT.mp4", help="write the episodes as seen, with step/reward/latency"
    )
    run.add_argument("--report", type=Path, metavar="REPORT.json", help="write the full report here")
    run.add_argument("--min-success-rate", type=float, help="exit 1 when the success rate is below this")
    run.add_argument(
        "--no-render-fix", action="store_true", help="let gym-aloha render its three cameras per step (to measure)"
    )
    run.set_defaults(func=cmd_run)

    oracle = commands.add_parser(
        "oracle-serve", help="serve the scripted transfer-cube expert over the daemon's protocol"
    )
    oracle.add_argument(
        "--endpoint", default="tcp://127.0.0.1:5555", help="where to bind (default tcp://127.0.0.1:5555)"
    )
    oracle.add_argument("--task", default=DEFAULT_TASK, choices=[DEFAULT_TASK])
    oracle.add_argument("--chunk-size", type=int, default=50, help="actions per reply (default 50, as pi0)")
    oracle.add_argument("--queue-size", type=int, default=4)
    oracle.set_defaults(func=cmd_oracle_serve)

    reference = commands.add_parser(
        "reference-serve",
        help="serve a checkpoint's PyTorch model (the exporter's reference) over the daemon's protocol",
    )
    reference.add_argument("--checkpoint", type=Path, required=True)
    reference.add_argument("--tokenizer", type=Path, help="SentencePiece model for the prompt (the bundle's)")
    reference.add_argument("--num-steps", type=int, help="flow-matching steps per chunk (default: the checkpoint's)")
    reference.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="default tcp://127.0.0.1:5557")
    reference.add_argument("--queue-size", type=int, default=4)
    reference.set_defaults(func=cmd_reference_serve)

    evaluation = commands.add_parser(
        "eval",
        help="success rates over held-out seeds: policies x denoising steps x chunk joining, episodes in parallel",
        description="Each configuration is served once (a bundle by pi0-runtime serve --num-steps N, a checkpoint "
        "by its PyTorch reference behind the same server) and --workers processes of `pi0-sim run` share it. "
        "Per configuration: success rate with a 95% Wilson interval, mean episode return, latency p50.",
    )
    evaluation.add_argument(
        "--policy", action="append", required=True, metavar="NAME=DIR",
        help="a bundle directory, or a checkpoint directory (served by the PyTorch reference; needs --tokenizer); "
        "repeat for several",
    )  # fmt: skip
    evaluation.add_argument("--tokenizer", type=Path, help="the bundles' tokenizer, for checkpoints")
    evaluation.add_argument("--steps", type=int, nargs="+", default=[10], help="denoising steps (default 10)")
    evaluation.add_argument(
        "--modes", nargs="+", default=["sync"], choices=["sync", "delay", "rtc"],
        help="sync: wait for each chunk; delay: inference lasts --delay steps, stale actions dropped; rtc: the same "
        "with real-time chunking (default sync)",
    )  # fmt: skip
    evaluation.add_argument("--delay", type=int, default=5, help="control steps per inference for delay/rtc (5)")
    evaluation.add_argument("--episodes", type=int, default=50, help="episodes per configuration (default 50)")
    evaluation.add_argument("--seed", type=int, default=0, help="first held-out seed (default 0)")
    evaluation.add_argument(
        "--demonstrations", type=Path, help="the training recordings: refuse seeds they used (held out for real)"
    )
    evaluation.add_argument("--workers", type=int, default=2, help="episode processes per configuration (2)")
    evaluation.add_argument("--actions-per-chunk", type=int, default=25, help="actions executed per chunk (25)")
    evaluation.add_argument("--max-steps", type=int, help="cut episodes at this many steps (default: the env's 300)")
    evaluation.add_argument("--prompt", help="the instruction sent with every request (default: the task's)")
    evaluation.add_argument("--report", type=Path, metavar="EVAL.json", help="every configuration's figures")
    evaluation.add_argument("--table", type=Path, metavar="TABLE.md", help="the markdown table")
    evaluation.set_defaults(func=cmd_eval)

    record = commands.add_parser("record", help="save scripted demonstrations (frames, states, actions, prompt)")
    record.add_argument("--out", type=Path, required=True, help="directory for episode_000000/, episode_000001/, ...")
    record.add_argument("--episodes", type=int, default=1)
    record.add_argument("--endpoint", help="record a policy server's episodes instead of the in-process oracle")
    add_task_arguments(record)
    record.set_defaults(func=cmd_record)

    stats = commands.add_parser(
        "stats", help="normalization statistics of recorded episodes, in pi0's ALOHA space (state and action)"
    )
    stats.add_argument("episodes", type=Path, help="a directory written by `pi0-sim record`")
    stats.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    stats.set_defaults(func=cmd_stats)

    training = commands.add_parser(
        "train",
        help="train a pi0-architecture policy by flow matching on recorded episodes; writes a LeRobot checkpoint",
        description="Train a pi0-architecture policy (our model code, a preset sized for a CPU) by flow matching on "
        "`pi0-sim record` episodes, and write OUT/checkpoint/ (LeRobot v0.3: config, weights, statistics) and "
        "OUT/tokenizer.model, ready for `pi0-export bundle`. Seeded, resumable (--resume), progress every 50 steps.",
    )
    training.add_argument("episodes", type=Path, help="a directory written by `pi0-sim record`")
    training.add_argument("--out", type=Path, required=True, help="output directory (checkpoint, state, losses)")
    training.add_argument(
        "--tokenizer", type=Path, help="SentencePiece model (default: train the project's own into OUT)"
    )
    # Defaults are sim.train.TrainSettings' (not imported here: it brings torch into every pi0-sim command).
    training.add_argument("--preset", help="model dimensions (default pi0-cpu)")
    training.add_argument("--steps", type=int, help="optimizer steps (default 3000)")
    training.add_argument("--batch-size", type=int, help="samples per step (default 16)")
    training.add_argument("--lr", type=float, help="peak learning rate, cosine decay (default 3e-4)")
    training.add_argument("--seed", type=int, help="seeds the init, the sampling and the noise (default 0)")
    training.add_argument("--frame-stride", type=int, help="use every k-th frame of each episode (default 1)")
    training.add_argument(
        "--snapshot-every", type=int, help="also write OUT/checkpoints/step_N/ every N steps (a learning curve)"
    )
    training.add_argument(
        "--weights-dtype", choices=["float32", "float16"], help="the final checkpoint's weights (default float32)"
    )
    training.add_argument("--resume", action="store_true", help="continue from OUT/train_state.{safetensors,json}")
    training.set_defaults(func=cmd_train)

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
    from exporter.source import add_source_arguments

    add_source_arguments(parity)
    parity.set_defaults(func=cmd_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SimError, DaemonError, PolicyError, ServerUnavailableError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())

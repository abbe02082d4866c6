"""Where a policy comes from on the command line (`--checkpoint DIR` or `--preset NAME`), shared by
`pi0-export` and `pi0-sim parity`. Importing this module does not import torch; loading does."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.dims import PRESETS
from exporter.errors import ExportError
from exporter.openpi_configs import ALOHA_SHORTHAND, CONFIGS
from exporter.readers import READERS

if TYPE_CHECKING:
    from exporter.checkpoint import LoadedPolicy

CHECKPOINT_NUMBERS = ("max_token_len", "action_horizon", "lora_alpha")  # flags passed on as reader options


def log(message: str) -> None:
    print(f"[pi0-export] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM, not getrusage's ru_maxrss: the latter
    carries the parent's high-water mark across fork and exec, so a child started by a big process
    (a test runner) would report its parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse a numeric flag given as zero or less, by the flag's name (None: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ExportError(f"--{name.replace('_', '-')} must be positive, not {value}")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        help="a LeRobot (v0.3 pi0; 0.4, 0.5, 0.6 pi0/pi05) or openpi (PyTorch pi0/pi0.5, or a JAX training step dir) checkpoint directory",
    )
    source.add_argument("--preset", choices=sorted(PRESETS), help="a random-weight pi0 with built-in dimensions")
    parser.add_argument(
        "--format",
        choices=["auto", *sorted(READERS)],
        default="auto",
        help="the checkpoint's format (default: told by its files: LeRobot >= 0.4 saves policy_preprocessor.json)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the preset's weights and of the sample's inputs (default 0)"
    )
    openpi = parser.add_argument_group(
        "openpi checkpoints only (openpi keeps these in its training config, not in the checkpoint)"
    )
    openpi.add_argument(
        "--asset-id",
        help="which assets/<asset id>/norm_stats.json to use when there are several (e.g. lerobot/aloha_sim_transfer_cube_human)",
    )
    config = openpi.add_mutually_exclusive_group()
    config.add_argument(
        "--openpi-config",
        metavar="NAME",
        help="the openpi training config the checkpoint was trained with (required for openpi checkpoints: "
        "it sets the robot's camera slots, ALOHA maps, delta actions, returned action dims, token budget and "
        f"default prompt); one of {', '.join(sorted(CONFIGS))}",
    )
    config.add_argument(
        "--robot",
        type=Path,
        metavar="ROBOT.toml",
        help="a robot adapter of your own, for a training config openpi does not publish: which request key "
        "fills which camera slot, the state's fields, the returned action dims, the delta mask, ALOHA maps "
        "(docs/conventions.md has an example)",
    )
    config.add_argument(
        "--aloha",
        action="store_const",
        const=ALOHA_SHORTHAND,
        dest="openpi_config",
        help=f"shorthand for --openpi-config {ALOHA_SHORTHAND} (ALOHA's inputs and outputs, absolute actions)",
    )
    proof = openpi.add_mutually_exclusive_group()
    proof.add_argument(
        "--prove-with",
        metavar="PYTHON",
        help="prove --robot against its training config: the Python where openpi and that config (the "
        "adapter's name) are importable runs the config's own transforms on random observations; any "
        "difference refuses the export",
    )
    proof.add_argument(
        "--proof",
        type=Path,
        metavar="CASES.npz",
        help="prove --robot against a recording of its config's transforms (exporter/openpi_recorder.py)",
    )
    openpi.add_argument(
        "--action-horizon",
        type=int,
        metavar="N",
        help="the training config's action_horizon (JAX checkpoints do not store it; converted ones: config.json)",
    )
    openpi.add_argument(
        "--lora-alpha",
        type=float,
        metavar="A",
        help="JAX LoRA checkpoints: the LoRAConfig alpha (default: the rank, as every openpi LoRA variant sets it)",
    )
    openpi.add_argument(
        "--max-token-len",
        type=int,
        metavar="N",
        help="the training config's max_token_len (default openpi's: 48 for pi0, 200 for pi0.5)",
    )


def load_source(args: argparse.Namespace) -> LoadedPolicy:
    """The policy `add_source_arguments`' flags name; they, and the checkpoint's path, are checked first."""
    check_positive(args, *CHECKPOINT_NUMBERS)
    start = time.perf_counter()
    if args.preset:
        from exporter.presets import build_preset

        log(f"building preset {args.preset} (random weights, seed {args.seed}) ...")
        policy = build_preset(args.preset, seed=args.seed)
    else:
        from exporter.checkpoint import checkpoint_directory, load_checkpoint

        directory = checkpoint_directory(args.checkpoint)
        log(f"loading {directory} ...")
        options = {"source_format": args.format}
        if args.asset_id is not None:
            options["asset_id"] = args.asset_id
        for name in ("openpi_config", "robot", "prove_with", "proof"):
            if getattr(args, name) is not None:
                options[name] = str(getattr(args, name))
        for name in CHECKPOINT_NUMBERS:
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
        policy = load_checkpoint(directory, **options)
    params = sum(p.numel() for p in policy.model.parameters())
    log(
        f"ready in {time.perf_counter() - start:.1f} s: {params / 1e6:.1f} M parameters, "
        f"peak RSS {peak_rss_mib():.0f} MiB"
    )
    return policy

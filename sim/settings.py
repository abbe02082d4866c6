"""Every `pi0-sim` command's settings, declared once: a frozen dataclass whose fields carry their default,
type and help (`setting`), from which `add_arguments` builds the command's flags and `from_arguments` the
settings object, so that no flag can be parsed and then dropped, and no default copied by hand.

A field `name: T = setting(default, help)` becomes `--name` (underscores as dashes): `T | None` takes a T,
`tuple[T, ...]` one or more, a bool defaulting to False is `--name` and one defaulting to True is
`--no-name`. What argparse needs beyond that (`choices`, `metavar`, `action`, `required`, another
`flag`) goes with the help. Importing this module imports neither torch nor MuJoCo.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from exporter.dims import PRESETS
from sim.env import DEFAULT_TASK, TASKS, task_named

MODES = ("sync", "delay", "rtc")  # how `pi0-sim eval` joins chunks (`sim.evaluate`)
S = TypeVar("S")


def setting(default: Any, help: str, **argument: Any) -> Any:
    """A settings field (a `dataclasses.field`, which ruff's RUF009 cannot tell): its default, its help and
    what argparse needs beyond its type."""
    return field(default=default, metadata={"help": help, "argument": argument})


def _kind(annotation: Any) -> tuple[type, bool]:
    """A field's type -> (the type of one value, whether it takes several)."""
    if isinstance(annotation, types.UnionType):  # T | None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:  # tuple[T, ...]
        return typing.get_args(annotation)[0], True
    return annotation, False


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _flag(f: Field) -> str:
    name = f.name.replace("_", "-")
    return f.metadata["argument"].get("flag", f"--no-{name}" if f.default is True else f"--{name}")


def add_arguments(parser: argparse.ArgumentParser, settings: type, only: Iterable[str] | None = None) -> None:
    """The fields of the dataclass `settings` (those named in `only`, when given) as `parser`'s flags."""
    hints = typing.get_type_hints(settings)
    for f in fields(settings):
        if only is not None and f.name not in only:
            continue
        argument = {k: v for k, v in f.metadata["argument"].items() if k != "flag"}
        kind, several = _kind(hints[f.name])
        text = f.metadata["help"]
        if kind is bool:
            argument["action"] = "store_false" if f.default else "store_true"
        else:
            argument["type"] = kind
            if several and "action" not in argument:
                argument["nargs"] = "+"
            if f.default not in (None, ()):
                text += f" (default {_shown(f.default)})"
        default = None if argument.get("action") == "append" else f.default  # argparse appends to its default
        parser.add_argument(_flag(f), dest=f.name, default=default, help=text, **argument)


def from_arguments(settings: type[S], args: argparse.Namespace) -> S:
    """The dataclass `settings` from what `add_arguments` parsed (fields it left out keep their defaults)."""
    values = {}
    for f in fields(settings):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return settings(**values)


def to_arguments(settings: Any) -> list[str]:
    """The flags that give `settings` back through `add_arguments` (a recipe's command line)."""
    argv: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, bool):
            argv += [_flag(f)] if value != f.default else []
        elif isinstance(value, tuple):
            if not value:  # no flag gives an empty tuple: it is the default
                continue
            repeated = f.metadata["argument"].get("action") == "append"
            argv += [x for item in value for x in (_flag(f), str(item))] if repeated else [_flag(f), *map(str, value)]
        elif value is not None:
            argv += [_flag(f), str(value)]
    return argv


@dataclass(frozen=True)
class RunSettings:
    """Closed-loop episodes (`sim.harness.run_episodes`): what `pi0-sim run` drives, `record` records and
    each `eval` worker runs."""

    task: str = setting(DEFAULT_TASK, "the gym-aloha task", choices=sorted(TASKS))
    prompt: str | None = setting(None, "the instruction sent with every request (default: the task's LeRobot prompt)")
    seed: int = setting(0, "seed of the first episode; episode i uses seed + i")
    episodes: int = setting(1, "how many episodes")
    max_steps: int | None = setting(None, "stop an episode after this many steps (default: the env's 300)")
    actions_per_chunk: int | None = setting(
        None, "execute the first K actions of each chunk (default: all)", metavar="K"
    )
    delay: int = setting(
        0,
        "take each inference to last D control steps (50 Hz): the next chunk is asked for D steps before the "
        "current one runs out and takes over at its index D; requests slower than that are counted as stalls",
        metavar="D",
    )
    rtc: bool = setting(
        False,
        "real-time chunking (with --delay): send the current chunk's remaining actions, so the next chunk joins "
        "it without a jump; the report has the action step and jerk at chunk boundaries",
    )
    end_on_success: bool = setting(
        True,
        "run every episode to --max-steps (or the env's time limit) even after it has succeeded: episodes of a "
        "fixed length whatever the policy does; an episode counts as a success if it succeeded at any step",
    )
    render_fix: bool = setting(True, "let gym-aloha render its three cameras per step (to measure)")
    timeout: float = setting(60.0, "seconds to wait for a reply before retrying")
    guidance_scale: float | None = setting(
        None,
        "classifier-free guidance's beta, sent with every request (a bundle exported with guidance: "
        "docs/guidance.md; default: the bundle's)",
        metavar="BETA",
    )

    @property
    def task_prompt(self) -> str:
        """The prompt sent: `prompt`, else the task's own."""
        return self.prompt or task_named(self.task).prompt


@dataclass(frozen=True)
class EvalSettings:
    """`pi0-sim eval` (`sim.evaluate.evaluate`): policies x denoising steps x chunk joining, over held-out seeds."""

    policies: tuple[str, ...] = setting(
        (),
        "a bundle directory, or a checkpoint directory (served by the PyTorch reference; needs --tokenizer); "
        "repeat for several",
        flag="--policy", action="append", required=True, metavar="NAME=DIR",
    )  # fmt: skip
    tokenizer: Path | None = setting(None, "the bundles' tokenizer, for checkpoints")  # noqa: RUF009 (a field)
    steps: tuple[int, ...] = setting((10,), "denoising steps")
    modes: tuple[str, ...] = setting(
        ("sync",),
        "sync: wait for each chunk; delay: inference lasts --delay steps, stale actions dropped; rtc: the same "
        "with real-time chunking",
        choices=MODES,
    )
    delay: int = setting(5, "control steps per inference for delay/rtc")
    episodes: int = setting(50, "episodes per configuration")
    seed: int = setting(0, "first held-out seed")
    demonstrations: Path | None = setting(  # noqa: RUF009 (a field)
        None, "the training recordings: refuse seeds they used (held out for real)"
    )
    workers: int = setting(2, "episode processes per configuration (with --ray: Ray tasks)")
    ray: str | None = setting(
        None,
        "run the episodes as Ray tasks on a cluster instead of local processes: `auto` (RAY_ADDRESS, else the "
        "cluster `ray start` began on this machine) or the head's HOST:PORT; --workers tasks per configuration, "
        "each serving the policy itself (the `ray` extra; docs/sim.md)",
        metavar="auto|ADDRESS",
    )
    actions_per_chunk: int = setting(25, "actions executed per chunk")
    max_steps: int | None = setting(None, "cut episodes at this many steps (default: the env's 300)")
    prompt: str | None = setting(None, "the instruction sent with every request (default: the task's)")
    end_on_success: bool = setting(
        True, "run every episode to --max-steps (or the time limit) even after success (see pi0-sim run)"
    )
    guidance: tuple[float, ...] = setting(
        (),
        "classifier-free guidance scales, each a configuration (bundles exported with guidance; default: each "
        "bundle's own)",
        metavar="BETA",
    )

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.episodes))


@dataclass(frozen=True)
class TrainSettings:
    """`pi0-sim train` (`sim.train.train`)."""

    preset: str = setting("pi0-cpu", "model dimensions", choices=sorted(PRESETS))
    steps: int = setting(3000, "optimizer steps")
    batch_size: int = setting(16, "samples per step")
    lr: float = setting(3e-4, "peak learning rate, cosine decay")
    weight_decay: float = setting(1e-4, "AdamW's weight decay")
    seed: int = setting(0, "seeds the init, the sampling and the noise")
    frame_stride: int = setting(1, "use every k-th frame of each episode")
    log_every: int = setting(50, "show the mean loss every N steps")
    checkpoint_every: int = setting(500, "write the training state (for --resume) every N steps")
    snapshot_every: int = setting(
        0, "also write OUT/checkpoints/step_N/ every N steps, a LeRobot checkpoint (a learning curve); 0: off"
    )
    weights_dtype: str = setting(
        "float32",
        "the final checkpoint's weights; float16 halves it (the exporter loads float32)",
        choices=["float32", "float16"],
    )
    init: Path | None = setting(  # noqa: RUF009 (a field)
        None,
        "start from this LeRobot checkpoint (its dimensions, weights and statistics; --preset is then unused), "
        "e.g. sim/policies/transfer-cube/checkpoint: a fine-tune",
        metavar="CHECKPOINT",
    )
    condition: bool = setting(
        False,
        "learn classifier-free guidance's condition (docs/guidance.md): each sample is labelled by its episode's "
        "outcome (meta.json `success`), successes positive and failures unconditioned; the checkpoint carries "
        "`condition_embedding` and exports with guidance",
    )
    condition_dropout: float = setting(
        0.1, "with --condition: the share of positive samples trained as unconditioned, so that branch sees them too"
    )

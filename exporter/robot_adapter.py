"""Your own robot: a robot adapter written as a small TOML file, and its proof against the training config.

An openpi checkpoint trained under a config of your own (your `<Robot>Inputs` / `<Robot>Outputs`, copied from
openpi's LIBERO or ALOHA ones with your keys) is exported with `--robot ROBOT.toml`, which says as data what
those classes do (`docs/conventions.md`, "Your own robot", has a commented example):

    name = "piper_pick"                    # your TrainConfig's name
    default_prompt = "pick up the cube"    # optional (InjectDefaultPrompt)
    [cameras]
    slots = ["observation/image", "observation/wrist_image", ""]  # base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb
    optional = []                          # keys that may be left out (a zero image, mask False)
    shape = [3, 224, 224]                  # what the robot sends, CHW
    images_key = "images"                  # optional: the cameras come nested under it (AlohaInputs)
    [state]
    fields = [["observation/state", 8]]    # concatenated in this order
    [actions]
    dim = 7                                # Outputs: actions[..., :7]
    delta_mask = [true, true, true, true, true, true, false]   # DeltaActions / AbsoluteActions; omit: absolute
    aloha_maps = false                     # AlohaInputs/Outputs(adapt_to_pi=True)
    [model]                                # optional, the config's model settings (default: Pi0Config's)
    action_horizon = 50
    max_token_len = 48
    discrete_state_input = true
    asset_id = "your/repo_id"
    [policy_metadata]                      # optional, served in the metadata as openpi's server does

The proof: where openpi is importable (your checkout, with your config in it), `--prove-with PYTHON` runs
`exporter/openpi_recorder.py` there: your config's own `data_transforms` on random observations in the
adapter's request format. `--proof CASES.npz` takes such a recording made earlier. Our pipeline then runs on
the same observations; any difference (which frame fills which slot, a mask, the state as the inputs leave
it, the actions as the outputs return them) refuses the export, naming the first field that differs. Without
either the bundle records the adapter as unproven.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import ExportError
from exporter.openpi_configs import OpenpiConfig, RobotFamily
from runtime.bundle.conventions import OPENPI
from runtime.bundle.spec import PolicySpec
from runtime.pipeline import transforms
from runtime.pipeline.model_io import adapted_state, postprocess, preprocess

SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's pi0/pi0.5 image slots, in order
RECORDER = Path(__file__).with_name("openpi_recorder.py")
PROOF_CASES = 200
TOLERANCE = 1e-5  # float32 against openpi's numpy (float64 where it computes the ALOHA grippers)
TABLES = {
    "": {"name", "default_prompt", "cameras", "state", "actions", "model", "policy_metadata"},
    "cameras": {"slots", "optional", "shape", "images_key"},
    "state": {"fields"},
    "actions": {"dim", "delta_mask", "aloha_maps"},
    "model": {"action_horizon", "max_token_len", "discrete_state_input", "asset_id"},
}


class RobotAdapterError(ExportError):
    """A robot adapter file that cannot be read, or that its proof refutes."""


def _expect(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise RobotAdapterError(f"{path}: {what}")


def _table(data: Mapping[str, Any], name: str, path: Path, required: bool = True) -> dict[str, Any]:
    table = data.get(name)
    _expect(table is not None or not required, path, f"[{name}] is missing")
    table = {} if table is None else table
    _expect(isinstance(table, dict), path, f"{name} must be a table")
    unknown = set(table) - TABLES[name]
    _expect(not unknown, path, f"[{name}] has unknown keys {sorted(unknown)}; known: {sorted(TABLES[name])}")
    return table


def read_adapter(path: str | Path) -> OpenpiConfig:
    """ROBOT.toml -> the training config it describes (its robot family "custom"), or RobotAdapterError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    _expect(path.is_file(), path, "no such file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RobotAdapterError(f"{path}: not TOML ({e})") from e
    unknown = set(data) - TABLES[""]
    _expect(not unknown, path, f"unknown keys {sorted(unknown)}; known: {sorted(TABLES[''])}")
    name = data.get("name")
    _expect(isinstance(name, str) and bool(name), path, "name (your training config's name) is required")
    cameras, state, actions = (_table(data, t, path) for t in ("cameras", "state", "actions"))
    model = _table(data, "model", path, required=False)
    slots = cameras.get("slots")
    _expect(
        isinstance(slots, list) and len(slots) == len(SLOTS) and all(isinstance(s, str) for s in slots),
        path,
        f"[cameras] slots must name the request key for each of {list(SLOTS)} ('' for an always-empty slot)",
    )
    keys = [s for s in slots if s]
    _expect(bool(keys), path, "[cameras] slots: at least one camera")
    _expect(len(set(keys)) == len(keys), path, "[cameras] slots: a key fills one slot only")
    _expect(
        slots[: len(keys)] == keys,
        path,
        "[cameras] slots: an always-empty slot before a camera is not supported (empty slots come last)",
    )
    optional = cameras.get("optional", [])
    _expect(isinstance(optional, list) and set(optional) <= set(keys), path, "[cameras] optional: keys of slots")
    shape = cameras.get("shape", [3, 224, 224])
    _expect(
        isinstance(shape, list)
        and len(shape) == 3
        and shape[0] == 3
        and all(isinstance(v, int) and v > 0 for v in shape),
        path,
        "[cameras] shape must be [3, height, width]",
    )
    fields = state.get("fields")
    _expect(
        isinstance(fields, list)
        and bool(fields)
        and all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], int) and f[1] > 0
            for f in fields
        ),
        path,
        '[state] fields must be a list of ["request key", size] pairs',
    )
    dim, mask = actions.get("dim"), actions.get("delta_mask")
    _expect(isinstance(dim, int) and dim > 0, path, "[actions] dim (how many action dims the robot takes) is required")
    _expect(
        mask is None or (isinstance(mask, list) and all(isinstance(v, bool) for v in mask) and len(mask) <= dim),
        path,
        f"[actions] delta_mask must be at most {dim} booleans",
    )
    aloha = actions.get("aloha_maps", False)
    _expect(isinstance(aloha, bool), path, "[actions] aloha_maps must be true or false")
    policy_metadata = data.get("policy_metadata", {})
    _expect(isinstance(policy_metadata, dict), path, "policy_metadata must be a table")
    prompt = data.get("default_prompt")
    _expect(prompt is None or isinstance(prompt, str), path, "default_prompt must be text")
    family = RobotFamily(
        name="custom",
        cameras=tuple(keys),
        optional_cameras=tuple(optional),
        empty_slots=len(SLOTS) - len(keys),
        camera_shape=tuple(shape),
        state_fields=tuple((k, n) for k, n in fields),
        action_dim=dim,
        aloha_maps=aloha,
        unused_cameras=(),
        source=f"robot adapter {path.name}",
        images_key=cameras.get("images_key"),
    )
    return OpenpiConfig(
        name=name,
        family=family,
        action_horizon=int(model.get("action_horizon", 50)),
        max_token_len=model.get("max_token_len"),
        discrete_state_input=model.get("discrete_state_input"),
        delta_action_mask=None if mask is None else tuple(mask),
        default_prompt=prompt,
        asset_id=model.get("asset_id"),
        policy_metadata=policy_metadata,
    )


# --- the proof -----------------------------------------------------------------------------------


def record(
    config_name: str,
    family: RobotFamily,
    python: str,
    out: Path,
    cases: int = PROOF_CASES,
    frame: tuple[int, int, int] | None = None,
) -> Path:
    """openpi's own transforms of the config on random observations, recorded by `openpi_recorder.py` run
    in `python` (the interpreter where openpi and the config are importable; PYTHONPATH as the caller's)."""
    request = json.dumps(family.request_format(frame))
    command = [python, str(RECORDER), "--config", config_name, "--request", request]
    try:
        result = subprocess.run([*command, "--out", str(out), "--cases", str(cases)], capture_output=True, text=True)
    except OSError as e:
        raise RobotAdapterError(f"--prove-with {python}: cannot run it ({e})") from e
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RobotAdapterError(f"openpi's transforms of {config_name} could not be recorded with {python}: {last}")
    return out


def _spec(config: OpenpiConfig) -> PolicySpec:
    """Our pipeline for the adapter, without statistics: the transforms compared sit outside normalization."""
    return config.policy_spec(max_state_dim=32, max_action_dim=32, chunk_size=4, num_steps=1, tokenizer_max_length=1)


def _first_difference(name: str, ours: np.ndarray, theirs: np.ndarray) -> str | None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        return f"{name}: shape {list(ours.shape)} here, {list(theirs.shape)} in openpi"
    differs = ~(np.abs(ours - theirs) <= TOLERANCE)
    if differs.any():
        index = tuple(int(i) for i in np.argwhere(differs)[0])  # the first, in order
        where = "".join(f"[{i}]" for i in index)
        return f"{name}{where}: {ours[index]:.6g} here, {theirs[index]:.6g} in openpi"
    return None


def prove(config: OpenpiConfig, recording: Path) -> str:
    """Our pipeline against openpi's recorded transforms on every case -> a line saying what was proven,
    or RobotAdapterError naming the first field that differs."""
    spec = _spec(config)
    robot = config.family
    try:
        with np.load(recording, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise RobotAdapterError(f"{recording}: not a proof recording ({e})") from e
    meta = json.loads(str(arrays.pop("meta")))
    if meta["config"] != config.name:
        raise RobotAdapterError(f"{recording} records openpi config {meta['config']!r}, the adapter is {config.name!r}")
    for i in range(meta["cases"]):
        obs = {k.split("/", 2)[2]: v for k, v in arrays.items() if k.startswith(f"{i}/obs/")}
        problem = _case(spec, robot, obs, {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}/")})
        if problem is not None:
            raise RobotAdapterError(
                f"the robot adapter does not do what openpi config {config.name} does: case {i} of {meta['cases']}, "
                f"{problem}"
            )
    return f"proven against openpi config {config.name}: {meta['cases']} random observations (seed {meta['seed']})"


def _case(
    spec: PolicySpec, robot: RobotFamily, obs: dict[str, np.ndarray], theirs: dict[str, np.ndarray]
) -> str | None:
    images = {k: v for k, v in obs.items() if k in spec.camera_keys}
    absent = sorted(set(spec.camera_keys) - set(images) - set(spec.optional_cameras))
    if absent:  # the recording's requests leave out only what the config's inputs accept missing
        return f"camera {absent[0]!r}: required by the adapter, but openpi's inputs took a request without it"
    missing = [k for k in obs if k not in images and k not in robot.state_keys]
    if missing:
        return f"request field {missing[0]!r} is neither a camera nor a state field of the adapter"
    try:
        raw = np.concatenate([np.ravel(obs[k]) for k in robot.state_keys]).astype(np.float32)
    except KeyError as e:
        return f"state field {e.args[0]!r}: the request has no such field"
    if raw.shape[0] != spec.state_dim:
        return f"state: {raw.shape[0]} values from {list(robot.state_keys)}, the adapter says {spec.state_dim}"
    state = adapted_state(spec, raw)
    inputs = preprocess(spec, images, state, np.zeros((1, 1), np.int64), np.ones((1, 1), bool))
    for slot, name in enumerate(SLOTS):
        if f"image/{name}" not in theirs:
            return f"image[{name}]: openpi's inputs have no such slot"
        want = transforms.prepare_image(theirs[f"image/{name}"], spec.image_size, OPENPI)
        problem = _first_difference(f"image[{name}]", inputs.images[0, slot], want) or _first_difference(
            f"image_mask[{name}]", inputs.image_masks[0, slot], theirs[f"image_mask/{name}"]
        )
        if problem is not None:
            return problem
    problem = _first_difference("state", state, theirs["state"])
    if problem is not None:
        return problem
    actions = postprocess(spec, theirs["actions_in"][None], raw)[0]
    return _first_difference("actions", actions, theirs["actions"])


def proof_of(config: OpenpiConfig, prove_with: str | None, proof: Path | None, log: Any) -> str | None:
    """The adapter proven by a recording given (`proof`) or made now (`prove_with`); None: unproven."""
    if proof is not None:
        return prove(config, proof) + f", recorded in {proof.name}"
    if prove_with is None:
        log(f"note: robot adapter {config.name} is unproven (--prove-with PYTHON or --proof CASES.npz proves it)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        recording = record(config.name, config.family, prove_with, Path(tmp) / "cases.npz")
        return prove(config, recording) + f", recorded now with {prove_with}"

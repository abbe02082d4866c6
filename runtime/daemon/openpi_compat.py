"""openpi's websocket protocol as `openpi-client` speaks it: msgpack with its ndarray encoding (a map
`{b"__ndarray__": True, b"data", b"dtype", b"shape"}`, openpi_client/msgpack_numpy.py) in both
directions, and the observation key sets openpi's robot examples send, mapped onto the bundle's cameras
and state. Decoding uses `pi0_client.wire` (bounded, no pickle, no msgpack library on the robot); only
numeric dtypes become arrays.

Observation key sets: the bundle's own where its training config says it (the metadata's `robot`: its camera
keys and `state_keys`, e.g. a user's robot adapter), else openpi's policies/*_policy.py inputs:
- ALOHA: `images: {cam_high, cam_low, cam_left_wrist, cam_right_wrist}` (CHW or HWC), `state`, `prompt`; a
  camera of that set that no model slot takes is accepted and left unused, as AlohaInputs does;
- LIBERO: `observation/image`, `observation/wrist_image`, `observation/state`, `prompt`;
- DROID: `observation/exterior_image_1_left`, `observation/wrist_image_left`,
  `observation/joint_position` + `observation/gripper_position` (the state, in that order), `prompt`.
LIBERO's and DROID's images go to the bundle's cameras in order (base, then wrist), as openpi's
LiberoInputs/DroidInputs put them in the base and left-wrist slots (a bundle exported with openpi's LIBERO or
DROID config takes these very keys). Frames may be uint8 or float in [0, 1], as openpi's `_parse_image` takes
them. Beyond openpi: `seed`, `noise`, and
real-time chunking's `prev_actions` and `delay` (runtime.pipeline.rtc) may be sent too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pi0_client import wire
from pi0_client.metadata import Metadata
from pi0_client.protocol import IMAGE_PREFIX, STATE_OUT_OF_RANGE
from runtime.pipeline.observation import Observation, ObservationError, guidance_scale

NDARRAY, NPGENERIC = b"__ndarray__", b"__npgeneric__"
NUMERIC_KINDS = "biuf"
# openpi's ALOHA camera names -> LeRobot's for the same camera (openpi's aloha_sim example feeds gym-aloha's
# `top` as cam_high), so that a LeRobot ALOHA bundle takes openpi's robot code unchanged.
CAMERA_ALIASES = {"cam_high": "top"}
ALOHA_CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")  # AlohaInputs.EXPECTED_CAMERAS
LIBERO_IMAGES = ("observation/image", "observation/wrist_image")
DROID_IMAGES = ("observation/exterior_image_1_left", "observation/wrist_image_left")
EXTRAS = ("prompt", "seed", "noise", "prev_actions", "delay", "guidance_scale")


def _array(d: dict) -> np.ndarray:
    try:
        dtype, shape, data = np.dtype(d[b"dtype"]), tuple(d[b"shape"]), d[b"data"]
    except (KeyError, TypeError) as e:
        raise ObservationError(f"malformed ndarray: {e}") from e
    if dtype.kind not in NUMERIC_KINDS or not isinstance(data, bytes) or any(n < 0 for n in shape):
        raise ObservationError(f"unsupported ndarray: dtype {dtype}, shape {list(shape)}")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
        raise ObservationError(f"ndarray of shape {list(shape)} and dtype {dtype} does not match its {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _arrays(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get(NDARRAY) is True:
            return _array(value)
        if value.get(NPGENERIC) is True:
            return _array({b"dtype": value[b"dtype"], b"shape": (), b"data": np.asarray(value[b"data"]).tobytes()})
        return {(k.decode() if isinstance(k, bytes) else k): _arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_arrays(v) for v in value]
    return value


def decode(message: bytes) -> Any:
    """One message as openpi-client packs it -> plain values with numpy arrays (ObservationError if not)."""
    try:
        return _arrays(wire.unpack(message))
    except wire.WireError as e:
        raise ObservationError(f"not a msgpack message: {e}") from e


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {NDARRAY: True, b"data": array.tobytes(), b"dtype": array.dtype.str, b"shape": list(array.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """Plain values with numpy arrays -> one message openpi-client's `msgpack_numpy.unpackb` reads."""
    return wire.pack(_plain(value))


def _camera(name: str, keys: tuple[str, ...]) -> str | None:
    """The bundle's camera an ALOHA camera name is; None for one of ALOHA's cameras that no model slot
    takes (openpi's AlohaInputs accepts its whole set and leaves those unused)."""
    for candidate in (name, IMAGE_PREFIX + name, IMAGE_PREFIX + CAMERA_ALIASES.get(name, name)):
        if candidate in keys:
            return candidate
    if name in ALOHA_CAMERAS:
        return None
    raise ObservationError(f"camera {name!r} is neither one of this policy's {list(keys)} nor ALOHA's")


def _image(value: Any, name: str) -> np.ndarray:
    """A frame as openpi's `_parse_image` takes it: uint8, or float in [0, 1] (scaled by 255 and cast)."""
    image = _numeric(value, name)
    if image.dtype.kind == "f":
        return (255 * image).astype(np.uint8)
    return image


def _numeric(value: Any, name: str) -> np.ndarray:
    """A field as a numeric array, or ObservationError (nested lists of mixed shapes, text, None...)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ObservationError(f"{name!r} is not an array: {e}") from e
    if array.dtype.kind not in NUMERIC_KINDS:
        raise ObservationError(f"{name!r} must be numeric, got {array.dtype}")
    return array


def _in_order(obs: dict, names: tuple[str, ...], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {keys[i]: _image(obs[name], name) for i, name in enumerate(names) if name in obs and i < len(keys)}


def observation(obs: Any, metadata: Metadata) -> Observation:
    """An observation dict as openpi's robot code sends it -> our Observation for this bundle."""
    if not isinstance(obs, dict):
        raise ObservationError(f"expected a map of observation fields, got {type(obs).__name__}")
    keys = metadata.camera_keys
    robot = metadata.extra.get("robot") or {}  # the bundle's own key set, where its training config says it
    state_keys = tuple(robot.get("state_keys") or ())
    if "images" not in obs and state_keys and all(k in obs for k in state_keys) and any(k in obs for k in keys):
        images = {key: _image(obs[key], key) for key in keys if key in obs}
        state = np.concatenate([np.ravel(_numeric(obs[key], key)) for key in state_keys])
        used = {*keys, *state_keys, *robot.get("unused_cameras", ())}
    elif "images" in obs:
        if not isinstance(obs["images"], dict):
            raise ObservationError("'images' must map camera names to frames")
        cameras = {str(name): (_camera(str(name), keys), frame) for name, frame in obs["images"].items()}
        images = {key: _image(frame, f"images.{name}") for name, (key, frame) in cameras.items() if key is not None}
        state, used = obs.get("state"), {"images", "state"}
    elif LIBERO_IMAGES[0] in obs:
        images, state, used = (
            _in_order(obs, LIBERO_IMAGES, keys),
            obs.get("observation/state"),
            {*LIBERO_IMAGES, "observation/state"},
        )
    elif DROID_IMAGES[0] in obs:
        parts = [obs.get("observation/joint_position"), obs.get("observation/gripper_position")]
        names = ("observation/joint_position", "observation/gripper_position")
        state = (
            None
            if any(p is None for p in parts)
            else np.concatenate([np.ravel(_numeric(p, n)) for p, n in zip(parts, names, strict=True)])
        )
        # DroidInputs reads these and ignores the rest; the second exterior camera is in no pi0 slot
        used = {
            *DROID_IMAGES,
            "observation/exterior_image_2_left",
            "observation/joint_position",
            "observation/gripper_position",
        }
        images = _in_order(obs, DROID_IMAGES, keys)
    else:
        raise ObservationError(
            "unknown observation keys: expected openpi's ALOHA ('images', 'state'), LIBERO ('observation/image', "
            f"'observation/state') or DROID ('observation/exterior_image_1_left', ...) set; got {sorted(obs)}"
        )
    unknown = set(obs) - used - set(EXTRAS)
    if unknown:
        raise ObservationError(f"unexpected observation keys {sorted(unknown)}")
    if state is None:
        raise ObservationError("the observation has no state")
    seed, delay = obs.get("seed"), obs.get("delay")
    for name, value in (("seed", seed), ("delay", delay)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ObservationError(f"{name!r} must be a non-negative integer")
    if (delay is None) != (obs.get("prev_actions") is None):
        raise ObservationError("real-time chunking needs both 'prev_actions' and 'delay'")
    prompt = obs.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ObservationError("'prompt' must be a string")
    optional = {k: _numeric(obs[k], k) for k in ("noise", "prev_actions") if obs.get(k) is not None}
    scale = guidance_scale(obs.get("guidance_scale"))
    return Observation(
        images, _numeric(state, "state"), prompt=prompt, seed=seed, delay=delay, guidance_scale=scale, **optional
    )


def reply(header: dict[str, Any], arrays: dict[str, np.ndarray], infer_ms: float) -> dict[str, Any]:
    """Our reply -> openpi's: `actions`, `policy_timing` (the engine's stages), `server_timing`; beyond
    openpi (its clients ignore unknown keys), `limits`, the state guard's `state_out_of_range` and `frames`
    (what was done to a frame whose aspect ratio is not its camera's: runtime.pipeline.letterbox)."""
    extras = ("limits", STATE_OUT_OF_RANGE, "frames")
    return {
        "actions": arrays["actions"],
        "policy_timing": {"infer_ms": header["timing"]["total_ms"], **header["timing"]},
        "server_timing": {"infer_ms": infer_ms},
        **{key: header[key] for key in extras if key in header},
    }

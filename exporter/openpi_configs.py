"""openpi's published training configs, by name, as data: what an openpi checkpoint does not record.

An openpi checkpoint holds weights and norm stats; its robot transforms (which request keys fill which
camera slot, ALOHA's joint and gripper maps, delta actions, which action dims come back), its model
settings (action horizon, token budget, `discrete_state_input`), its default prompt and its
`policy_metadata` live in the training config (`src/openpi/training/config.py`, `_CONFIGS`; commit
15a9616a). Each entry here is one of those configs, read from that file; the robot families are the
input/output transforms of `src/openpi/policies/{aloha,libero,droid}_policy.py`. An openpi checkpoint is
never exported without one of them named: a guess about delta actions sends the arm to the wrong place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.bundle.conventions import OPENPI
from runtime.bundle.robot import Family
from runtime.bundle.spec import PolicySpec

OPENPI_COMMIT = "15a9616a00943ada6c20a0f158e3adb39df2ccac"
CONFIG_SOURCE = "openpi: src/openpi/training/config.py"


@dataclass(frozen=True)
class RobotFamily:
    """One family's input and output transforms (openpi's `<Family>Inputs` / `<Family>Outputs`) as our
    policy settings: the request's camera keys in the order of the model's slots (base, left wrist, right
    wrist), the trailing slots filled with a zero image and mask False, and the dims of state and actions."""

    name: Family
    cameras: tuple[str, ...]
    optional_cameras: tuple[str, ...]
    empty_slots: int  # zero image (-1 after scaling), mask False; openpi's `np.zeros_like(base_image)`
    camera_shape: tuple[int, int, int]  # what the family's clients send, CHW
    state_fields: tuple[tuple[str, int], ...]  # the request's fields concatenated, in order, into the state
    action_dim: int  # `<Family>Outputs`: `actions[..., :action_dim]`
    aloha_maps: bool  # AlohaInputs/Outputs(adapt_to_pi=True): joint flips, gripper maps
    unused_cameras: tuple[str, ...]  # accepted by the family's inputs, in no model slot
    source: str
    images_key: str | None = None  # the cameras come nested under it (ALOHA's `images`), else flat keys

    @property
    def state_dim(self) -> int:
        return sum(size for _, size in self.state_fields)

    @property
    def state_keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.state_fields)

    def request_format(self, frame: tuple[int, int, int] | None = None) -> dict[str, Any]:
        """The request's format as `exporter/openpi_recorder.py` takes it (JSON); `frame` (CHW) instead of
        the cameras' own size keeps a recording small (which frame fills which slot shows at any size)."""
        return {
            "cameras": {
                key: {"shape": list(frame or self.camera_shape), "optional": key in self.optional_cameras}
                for key in self.cameras
            },
            "images_key": self.images_key,
            # AlohaInputs (cameras nested under `images`) transposes every frame from CHW; the flat key
            # sets' `_parse_image` takes HWC and CHW
            "layouts": ["chw"] if self.images_key is not None else ["hwc", "chw"],
            "state": [list(field) for field in self.state_fields],
        }


FAMILIES = {
    "aloha": RobotFamily(
        name="aloha",
        cameras=("cam_high", "cam_left_wrist", "cam_right_wrist"),
        optional_cameras=("cam_left_wrist", "cam_right_wrist"),
        empty_slots=0,
        camera_shape=(3, 480, 640),
        state_fields=(("state", 14),),
        action_dim=14,
        aloha_maps=True,
        unused_cameras=("cam_low",),
        source="openpi: src/openpi/policies/aloha_policy.py (AlohaInputs, AlohaOutputs, adapt_to_pi=True)",
        images_key="images",
    ),
    "libero": RobotFamily(
        name="libero",
        cameras=("observation/image", "observation/wrist_image"),
        optional_cameras=(),
        empty_slots=1,
        camera_shape=(3, 224, 224),
        state_fields=(("observation/state", 8),),
        action_dim=7,
        aloha_maps=False,
        unused_cameras=(),
        source="openpi: src/openpi/policies/libero_policy.py (LiberoInputs, LiberoOutputs)",
    ),
    "droid": RobotFamily(
        name="droid",
        cameras=("observation/exterior_image_1_left", "observation/wrist_image_left"),
        optional_cameras=(),
        empty_slots=1,
        camera_shape=(3, 224, 224),
        state_fields=(("observation/joint_position", 7), ("observation/gripper_position", 1)),
        action_dim=8,
        aloha_maps=False,
        unused_cameras=("observation/exterior_image_2_left",),
        source="openpi: src/openpi/policies/droid_policy.py (DroidInputs, DroidOutputs)",
    ),
}


def bool_mask(*dims: int) -> tuple[bool, ...]:
    """openpi's `transforms.make_bool_mask`: (6, -1) -> six True, one False."""
    return tuple(flag for d in dims for flag in ([d > 0] * abs(d)))


ALOHA_DELTA = bool_mask(6, -1, 6, -1)  # LeRobotAlohaDataConfig.use_delta_joint_actions
LIBERO_DELTA = bool_mask(6, -1)  # LeRobotLiberoDataConfig.extra_delta_transform
DROID_JOINT_DELTA = bool_mask(7, -1)  # RLDSDroidDataConfig, action_space JOINT_POSITION
ALOHA_RESET_POSE = {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}


@dataclass(frozen=True)
class OpenpiConfig:
    """One training config: its robot family (inputs and outputs) and the rest the checkpoint does not record."""

    name: str
    family: RobotFamily
    pi05: bool = False
    action_horizon: int = 50  # Pi0Config's default
    max_token_len: int | None = None  # None: Pi0Config's, 200 for pi0.5 and 48 for pi0
    discrete_state_input: bool | None = None  # None: Pi0Config's, = pi05
    delta_action_mask: tuple[bool, ...] | None = None
    default_prompt: str | None = None
    asset_id: str | None = None
    policy_metadata: dict[str, Any] = field(default_factory=dict)

    def policy_spec(self, **model: Any) -> PolicySpec:
        """Our `PolicySpec` for this config's robot under openpi's conventions; `model` gives the rest
        (padded dims, chunk size, flow steps, token budget, statistics, state in the prompt)."""
        robot = self.family
        return PolicySpec(
            conventions=OPENPI.name,
            camera_keys=robot.cameras,
            camera_shapes=(robot.camera_shape,) * len(robot.cameras),
            optional_cameras=robot.optional_cameras,
            empty_cameras=robot.empty_slots,
            image_size=(224, 224),
            state_dim=robot.state_dim,
            action_dim=robot.action_dim,
            adapt_to_pi_aloha=robot.aloha_maps,
            delta_action_mask=self.delta_action_mask,
            delta_reference="adapted_state",
            **model,
        )

    def token_budget(self, pi05: bool) -> int:
        """max_token_len for a model of the type the weights show (Pi0Config's default follows pi05)."""
        return self.max_token_len if self.max_token_len is not None else (200 if pi05 else 48)

    def state_in_prompt(self, pi05: bool) -> bool:
        """discrete_state_input for a model of the type the weights show (Pi0Config's default: pi05)."""
        return pi05 if self.discrete_state_input is None else self.discrete_state_input and pi05


def _aloha(name: str, pi05: bool = False, **kw: Any) -> OpenpiConfig:
    kw.setdefault("delta_action_mask", ALOHA_DELTA)
    kw.setdefault("asset_id", "trossen")
    return OpenpiConfig(name, FAMILIES["aloha"], pi05=pi05, **kw)


CONFIGS = {
    c.name: c
    for c in (
        _aloha("pi0_aloha", policy_metadata=ALOHA_RESET_POSE),
        _aloha("pi05_aloha", pi05=True, policy_metadata=ALOHA_RESET_POSE),
        _aloha("pi0_aloha_towel", default_prompt="fold the towel", policy_metadata=ALOHA_RESET_POSE),
        _aloha(
            "pi0_aloha_tupperware",
            default_prompt="open the tupperware and put the food on the plate",
            policy_metadata=ALOHA_RESET_POSE,
        ),
        _aloha("pi0_aloha_pen_uncap", default_prompt="uncap the pen"),
        _aloha("pi05_aloha_pen_uncap", pi05=True, default_prompt="uncap the pen"),
        _aloha(
            "pi0_aloha_sim",
            delta_action_mask=None,
            default_prompt="Transfer cube",
            asset_id="lerobot/aloha_sim_transfer_cube_human",
        ),
        OpenpiConfig(
            "pi0_libero", FAMILIES["libero"], delta_action_mask=LIBERO_DELTA, asset_id="physical-intelligence/libero"
        ),
        OpenpiConfig(
            "pi0_libero_low_mem_finetune",
            FAMILIES["libero"],
            delta_action_mask=LIBERO_DELTA,
            asset_id="physical-intelligence/libero",
        ),
        OpenpiConfig(
            "pi05_libero",
            FAMILIES["libero"],
            pi05=True,
            action_horizon=10,
            discrete_state_input=False,
            asset_id="physical-intelligence/libero",
        ),
        OpenpiConfig("pi0_droid", FAMILIES["droid"], action_horizon=10, asset_id="droid"),
        OpenpiConfig("pi05_droid", FAMILIES["droid"], pi05=True, action_horizon=15, asset_id="droid"),
        OpenpiConfig(
            "pi05_full_droid_finetune",
            FAMILIES["droid"],
            pi05=True,
            action_horizon=16,
            delta_action_mask=DROID_JOINT_DELTA,
            asset_id="droid",
        ),
        OpenpiConfig("pi05_droid_finetune", FAMILIES["droid"], pi05=True, action_horizon=16, asset_id="droid"),
    )
}
# Configs of openpi's autoregressive pi0-FAST, which is not the flow-matching pi0 this exporter builds.
FAST_CONFIGS = (
    "pi0_fast_droid",
    "pi0_fast_libero",
    "pi0_fast_libero_low_mem_finetune",
    "pi0_fast_full_droid_finetune",
)
ALOHA_SHORTHAND = "pi0_aloha_sim"  # what `--aloha` names


def openpi_config(name: str | None) -> OpenpiConfig:
    """The named config, or ValueError listing the choices (a name is always required)."""
    choices = ", ".join(sorted(CONFIGS))
    if name is None:
        raise ValueError(
            "an openpi checkpoint does not record its training config's robot transforms (camera slots, "
            "ALOHA maps, delta actions, which action dims come back): name it with --openpi-config NAME, "
            f"one of: {choices}"
        )
    if name in FAST_CONFIGS:
        raise ValueError(
            f"{name} is a pi0-FAST config (autoregressive action tokens); this exporter builds pi0 and pi0.5"
        )
    if name not in CONFIGS:
        raise ValueError(f"unknown openpi config {name!r}; known: {choices}")
    return CONFIGS[name]

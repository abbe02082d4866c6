"""A scripted expert for transfer-cube that succeeds, to prove the harness (a random-weight pi0 cannot).

It is the ACT paper's data generation (tonyzhaozh/act, `scripted_policy.py` and
`record_sim_episodes.py`), served like a policy:
1. from the first frame of an episode, find the red cube in the `top` camera and place it on the
   spawn plane (it starts 5 cm up and falls; the plan uses the spawn pose, as ACT's does);
2. roll the pick-and-transfer end-effector plan out in gym-aloha's mocap-driven end-effector model.
   MuJoCo 3 made the mocap weld as shipped too soft for the arm to follow, so its `eq_solimp` is
   stiffened to (0.9, 0.95, 0.001); as shipped, no episode succeeds;
3. take the joint trajectory of that rollout (grippers from their controls) and replay it in the
   joint-space model, remembering the state after each step.
Each request is then answered with the next `chunk_size` joint actions, found by matching the robot's
state against the replay; a state at the start pose begins a new episode. `TransferCubeOracle` has the
engine's surface, so `pi0-runtime`'s own server serves it (`pi0-sim oracle-serve`) and a client cannot
tell it from the daemon.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from devtools.supervise import Daemon
from pi0_client.metadata import Camera, Metadata, PromptInfo
from runtime.engine import EngineError
from runtime.pipeline.observation import Observation
from sim.env import ensure_gl_backend, make_env, task_named
from sim.errors import bindable

WELD_SOLIMP = (0.9, 0.95, 0.001)
SPAWN_HEIGHT = 0.05  # gym_aloha.utils.sample_box_pose's z
PLAN_STEPS = 400  # ACT's episode length for transfer-cube; gym-aloha stops at 300, success comes near 210
CUBE_MIN_PIXELS = 20
START_TOLERANCE = 1e-5  # a state this close to the start pose is a fresh reset
TRACK_TOLERANCE = 0.1  # farther than this from every planned state: the robot is not following the plan
# (measured: at most 0.009 over whole episodes, from contact with a cube found ~1 mm off)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (w, x, y, z) quaternions."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ]
    )


def quat_about(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    half = np.deg2rad(degrees) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * np.asarray(axis, dtype=float)])


def offset(dx: float, dy: float, dz: float) -> np.ndarray:
    return np.array([dx, dy, dz])


@dataclass(frozen=True)
class Waypoint:
    t: int
    xyz: np.ndarray
    quat: np.ndarray
    gripper: float  # normalized: 0 closed, 1 open


def transfer_plan(mocap_left: np.ndarray, mocap_right: np.ndarray, box_xyz: np.ndarray) -> tuple[list, list]:
    """ACT's PickAndTransferPolicy waypoints: the right arm picks the cube and meets the left arm,
    which takes it. Mocap poses are (x, y, z, qw, qx, qy, qz)."""
    pick = quat_multiply(mocap_right[3:], quat_about((0.0, 1.0, 0.0), -60))
    meet_left = quat_about((1.0, 0.0, 0.0), 90)
    level = np.array([1.0, 0.0, 0.0, 0.0])
    meet = np.array([0.0, 0.5, 0.25])
    left = [
        Waypoint(0, mocap_left[:3], mocap_left[3:], 0),  # sleep
        Waypoint(100, meet + offset(-0.1, 0, -0.02), meet_left, 1),  # approach the meeting point
        Waypoint(260, meet + offset(0.02, 0, -0.02), meet_left, 1),  # move to it
        Waypoint(310, meet + offset(0.02, 0, -0.02), meet_left, 0),  # close the gripper
        Waypoint(360, meet + offset(-0.1, 0, -0.02), level, 0),  # move left
        Waypoint(400, meet + offset(-0.1, 0, -0.02), level, 0),  # stay
    ]
    right = [
        Waypoint(0, mocap_right[:3], mocap_right[3:], 0),  # sleep
        Waypoint(90, box_xyz + offset(0, 0, 0.08), pick, 1),  # approach the cube
        Waypoint(130, box_xyz + offset(0, 0, -0.015), pick, 1),  # go down
        Waypoint(170, box_xyz + offset(0, 0, -0.015), pick, 0),  # close the gripper
        Waypoint(200, meet + offset(0.05, 0, 0), pick, 0),  # approach the meeting point
        Waypoint(220, meet, pick, 0),  # move to it
        Waypoint(310, meet, pick, 1),  # open the gripper
        Waypoint(360, meet + offset(0.1, 0, 0), pick, 1),  # move right
        Waypoint(400, meet + offset(0.1, 0, 0), pick, 1),  # stay
    ]
    return left, right


def interpolate(waypoints: list[Waypoint], t: int) -> np.ndarray:
    """The end-effector command at step t: linear between waypoints (quaternions too, as ACT does)."""
    for current, following in itertools.pairwise(waypoints):
        if t < following.t or following is waypoints[-1]:
            f = min((t - current.t) / (following.t - current.t), 1.0)
            xyz = current.xyz + (following.xyz - current.xyz) * f
            quat = current.quat + (following.quat - current.quat) * f
            gripper = current.gripper + (following.gripper - current.gripper) * f
            return np.concatenate([xyz, quat, [gripper]])
    raise ValueError(f"no waypoint after step {t}")


def camera_projection(physics: Any, camera: str, height: int, width: int) -> np.ndarray:
    """The 3x4 matrix from world points to (u, v) pixels of `physics.render(height, width, camera)`.

    MuJoCo cameras look down their -z axis with y up; rendered rows run top to bottom."""
    position = physics.named.data.cam_xpos[camera]
    rotation = physics.named.data.cam_xmat[camera].reshape(3, 3)
    focal = 0.5 * height / np.tan(np.deg2rad(physics.named.model.cam_fovy[camera]) / 2)
    intrinsics = np.array([[-focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]])
    return intrinsics @ rotation.T @ np.hstack([np.eye(3), -position[:, None]])


def on_plane(projection: np.ndarray, pixel: np.ndarray, z: float) -> np.ndarray:
    """The (x, y) on the plane at height z that projects to `pixel`."""
    u, v = pixel
    rows = np.stack([projection[0] - u * projection[2], projection[1] - v * projection[2]])
    return np.linalg.solve(rows[:, :2], -(rows[:, 2] * z + rows[:, 3]))


def red_centroid(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Centre (u, v) and size in pixels of what is clearly red (the cube renders as about 255, 61, 61)."""
    rgb = image.astype(np.int16)
    mask = rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]) > 80
    v, u = np.nonzero(mask)
    if u.size == 0:
        return np.full(2, np.nan), 0
    return np.array([u.mean(), v.mean()]), int(u.size)


@dataclass(frozen=True)
class Plan:
    actions: np.ndarray  # [PLAN_STEPS + 1, 14] joint actions
    states: np.ndarray  # [PLAN_STEPS + 2, 14]: states[k] is the state before actions[k], in the replay
    rewards: np.ndarray  # [PLAN_STEPS + 1]: the replay's reward after each action (4: transferred)


class TransferCubeOracle:
    """The scripted expert with the engine's surface (`metadata`, `infer`, `close`)."""

    camera_key = "observation.images.top"

    def __init__(self, chunk_size: int = 50) -> None:
        ensure_gl_backend()  # it renders nothing, but importing MuJoCo fixes the process's GL backend
        from dm_control import mujoco
        from gym_aloha.constants import ASSETS_DIR, START_ARM_POSE, normalize_puppet_gripper_position

        self.chunk_size = chunk_size
        self._assets = ASSETS_DIR
        self._normalize_gripper = normalize_puppet_gripper_position
        scene = mujoco.Physics.from_xml_path(str(ASSETS_DIR / "bimanual_viperx_transfer_cube.xml"))
        scene.forward()
        self._projection: dict[tuple[int, int], np.ndarray] = {}  # by image size
        self._scene = scene
        start = np.asarray(START_ARM_POSE, dtype=float)
        self.start_state = np.concatenate(
            [
                start[:6],
                [normalize_puppet_gripper_position(start[6])],
                start[8:14],
                [normalize_puppet_gripper_position(start[14])],
            ]
        )
        self.actions: np.ndarray | None = None  # the current episode's plan (see `Plan`)
        self.states: np.ndarray | None = None
        self.step = 0
        self.box_xyz: np.ndarray | None = None

    # --- planning ----------------------------------------------------------------------------------

    def find_cube(self, image: np.ndarray) -> np.ndarray:
        """The cube's spawn position (x, y, z) seen in the `top` camera's frame."""
        height, width = image.shape[:2]
        if (height, width) not in self._projection:
            self._projection[height, width] = camera_projection(self._scene, "top", height, width)
        pixel, size = red_centroid(image)
        if size < CUBE_MIN_PIXELS:
            raise EngineError("bad_request", f"no red cube in the top camera ({size} red pixels): not transfer-cube?")
        x, y = on_plane(self._projection[height, width], pixel, SPAWN_HEIGHT)
        return np.array([x, y, SPAWN_HEIGHT])

    def plan(self, box_xyz: np.ndarray, weld_solimp: tuple[float, float, float] = WELD_SOLIMP) -> Plan:
        """Roll the end-effector plan out and replay its joint trajectory (see the module docstring)."""
        from dm_control import mujoco
        from dm_control.rl import control
        from gym_aloha.constants import DT
        from gym_aloha.tasks import sim, sim_end_effector

        box_pose = np.concatenate([box_xyz, [1.0, 0.0, 0.0, 0.0]])

        class EndEffectorTask(sim_end_effector.TransferCubeEndEffectorTask):
            def initialize_episode(self, physics: Any) -> None:
                self.initialize_robots(physics)
                box = physics.model.name2id("red_box_joint", "joint")
                physics.data.qpos[box : box + 7] = box_pose
                sim_end_effector.BimanualViperXEndEffectorTask.initialize_episode(self, physics)

            def get_observation(self, physics: Any) -> dict[str, np.ndarray]:  # no cameras: nothing looks
                return {
                    "qpos": self.get_qpos(physics),
                    "gripper_ctrl": physics.data.ctrl.copy(),
                    "mocap_left": np.concatenate([physics.data.mocap_pos[0], physics.data.mocap_quat[0]]),
                    "mocap_right": np.concatenate([physics.data.mocap_pos[1], physics.data.mocap_quat[1]]),
                }

        class JointTask(sim.TransferCubeTask):
            def get_observation(self, physics: Any) -> dict[str, np.ndarray]:
                return {"qpos": self.get_qpos(physics)}

        physics = mujoco.Physics.from_xml_path(str(self._assets / "bimanual_viperx_end_effector_transfer_cube.xml"))
        physics.model.eq_solimp[:, :3] = weld_solimp
        env = control.Environment(physics, EndEffectorTask(), float("inf"), control_timestep=DT, flat_observation=False)
        ts = env.reset()
        left, right = transfer_plan(ts.observation["mocap_left"], ts.observation["mocap_right"], box_xyz)
        rollout = [ts.observation]
        for t in range(PLAN_STEPS):
            rollout.append(env.step(np.concatenate([interpolate(left, t), interpolate(right, t)])).observation)
        actions = np.stack([o["qpos"] for o in rollout])
        grippers = np.stack([o["gripper_ctrl"][[0, 2]] for o in rollout])
        actions[:, [6, 13]] = self._normalize_gripper(grippers)

        physics = mujoco.Physics.from_xml_path(str(self._assets / "bimanual_viperx_transfer_cube.xml"))
        sim.BOX_POSE[0] = box_pose  # gym-aloha's task reads its cube pose from this module global
        env = control.Environment(physics, JointTask(), float("inf"), control_timestep=DT, flat_observation=False)
        states, rewards = [env.reset().observation["qpos"]], []
        for action in actions:
            step = env.step(action)
            states.append(step.observation["qpos"])
            rewards.append(step.reward)
        return Plan(actions.astype(np.float32), np.stack(states), np.array(rewards))

    # --- the engine's surface ----------------------------------------------------------------------

    def device_memory(self) -> None:
        return None  # no accelerator

    def metadata(self) -> Metadata:
        return Metadata(
            cameras=(Camera(self.camera_key, (3, 480, 640)),),
            image_layouts=("HxWx3",),
            state_dim=14,
            action_dim=14,
            chunk_size=self.chunk_size,
            prompt=PromptInfo(max_tokens=None, tokenizer=False),
            backend="scripted-oracle",
            source="oracle:transfer_cube (ACT's scripted pick-and-transfer)",
        )

    def infer(
        self, obs: Observation, trace: dict | None = None, notes: dict[str, str] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The next `chunk_size` joint actions for the robot in `obs.state`; prompt, tokens, noise and the
        frames are ignored (nothing to trace or note)."""
        start = time.perf_counter()
        state = np.asarray(obs.state, dtype=float).reshape(-1)
        if state.shape != (14,) or not np.isfinite(state).all():
            raise EngineError("bad_request", f"state must be 14 finite floats, got {list(state.shape)}")
        image = obs.images.get(self.camera_key)
        if image is None or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise EngineError("bad_request", f"{self.camera_key} must be a uint8 HxWx3 frame")
        planned = 0.0
        if np.abs(state - self.start_state).max() < START_TOLERANCE:
            self.box_xyz = self.find_cube(image)
            plan = self.plan(self.box_xyz)
            self.actions, self.states = plan.actions, plan.states
            self.step = 0
            planned = (time.perf_counter() - start) * 1e3
        elif self.actions is None:
            raise EngineError("bad_request", "the oracle starts at gym-aloha's start pose: reset the episode first")
        else:  # where the replay passed closest to this state, at or after the last answer
            distances = np.abs(self.states[self.step : self.step + 2 * self.chunk_size + 1] - state).max(axis=1)
            if distances.min() > TRACK_TOLERANCE:
                raise EngineError(
                    "bad_request",
                    f"the robot is {distances.min():.3f} away from the oracle's plan: it did not follow it "
                    "(reset to the start pose to plan again)",
                )
            self.step += int(np.argmin(distances))
        chunk = self.actions[self.step : self.step + self.chunk_size]
        if len(chunk) < self.chunk_size:  # past the plan's end: hold the last pose
            chunk = np.concatenate([chunk, np.repeat(self.actions[-1:], self.chunk_size - len(chunk), axis=0)])
        total = (time.perf_counter() - start) * 1e3
        return chunk, {"plan_ms": planned, "total_ms": total}

    def close(self) -> None:
        pass


def serve_command(args: argparse.Namespace) -> int:
    """`pi0-sim oracle-serve`: the oracle behind the daemon's own server, until SIGTERM."""
    from runtime.daemon.server import Server, ServerConfig

    config = ServerConfig(endpoint=bindable(args.endpoint), queue_size=args.queue_size, warm_up=False)
    make_env(task_named(args.task)).close()  # choose the GL backend and fail early if gym-aloha is missing
    return Server(lambda: TransferCubeOracle(chunk_size=args.chunk_size), config).serve()


def oracle_daemon(endpoint: str | None = None) -> Daemon:
    """`pi0-sim oracle-serve` in a child process, supervised like the daemon."""
    return Daemon([sys.executable, "-m", "sim.cli", "oracle-serve"], endpoint)

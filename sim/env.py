"""gym-aloha environments, headless, rendering only the camera the policy sees.

gym-aloha's tasks render three 480x640 cameras (`top`, `angle`, `front_close`) on every step but
return only `top`; `render_only_top` replaces the task's observation function with one that renders
`top` alone (the per-step time with and without it is in docs/benchmarks.md), and, in a closed loop
that looks at the frame only when it asks for a chunk, only then (`TopCamera.lazy`).

MuJoCo picks its OpenGL backend from `MUJOCO_GL` when it is first imported, so `select_gl_backend`
must run before anything imports mujoco or dm_control: EGL (headless, GPU or Mesa) when it works,
else OSMesa (software; `apt install libosmesa6`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from pi0_client.metadata import Camera
from pi0_client.protocol import IMAGE_PREFIX
from runtime.daemon.openpi_compat import CAMERA_ALIASES
from runtime.pipeline.observation import Observation
from sim.errors import SimError

GL_BACKENDS = ("egl", "osmesa")
_GL_PROBE = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"


def select_gl_backend() -> str:
    """Set MUJOCO_GL (and PyOpenGL's platform) to the first backend that creates a context here."""
    chosen = os.environ.get("MUJOCO_GL")
    candidates = (chosen,) if chosen else GL_BACKENDS
    for backend in candidates:
        env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
        probe = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = backend
            return backend
    raise SimError(
        f"no OpenGL backend for MuJoCo works here (tried {', '.join(candidates)}): install libegl1 "
        "(EGL, with Mesa or a GPU driver) or libosmesa6 (software rendering)"
    )


def ensure_gl_backend() -> str:
    """Call before the first import of mujoco or dm_control: keeps a MUJOCO_GL already set, else selects."""
    return os.environ.get("MUJOCO_GL") or select_gl_backend()


@dataclass(frozen=True)
class Task:
    name: str  # gym-aloha's registered id, without the `gym_aloha/` namespace
    internal: str  # gym-aloha's task name
    prompt: str  # the instruction LeRobot's ALOHA-sim datasets carry for this task


TASKS = {
    task.name: task
    for task in (
        Task(
            "AlohaTransferCube-v0",
            "transfer_cube",
            "Pick up the cube with the right arm and transfer it to the left arm.",
        ),
        Task("AlohaInsertion-v0", "insertion", "Insert the peg into the socket."),
    )
}
DEFAULT_TASK = "AlohaTransferCube-v0"
CAMERAS = ("top",)  # what gym-aloha returns; the other cameras it renders are discarded
STATE_DIM = 14
FPS = 50


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise SimError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def make_env(task: Task, render_fix: bool = True) -> Any:
    """The gym-aloha environment (pixels + the 14-dim `agent_pos`, time limit 300 steps)."""
    ensure_gl_backend()
    import gym_aloha  # noqa: F401  (registers the environments)
    import gymnasium as gym

    # The passive checker would flag the empty frames of `TopCamera.lazy` observations (a frame is rendered
    # when a request needs it).
    env = gym.make(f"gym_aloha/{task.name}", obs_type="pixels_agent_pos", disable_env_checker=True)
    if render_fix:
        render_only_top(env)
    return env


class TopCamera:
    """gym-aloha's `top` camera, rendered alone. With `lazy` set, the task's observations carry an empty
    frame and `frame()` renders the present one when someone needs it: a closed loop that asks for a
    chunk every K steps renders K times fewer frames (the rest of the observation is unchanged)."""

    EMPTY = np.zeros((0, 0, 3), dtype=np.uint8)

    def __init__(self, aloha: Any) -> None:
        self.aloha, self.lazy = aloha, False

    def frame(self, physics: Any = None) -> np.ndarray:
        physics = physics if physics is not None else self.aloha._env.physics
        return physics.render(height=self.aloha.observation_height, width=self.aloha.observation_width, camera_id="top")

    def with_frame(self, obs: dict[str, Any]) -> dict[str, Any]:
        """`obs` (the latest observation) with its frame rendered, if it was left empty."""
        if obs["pixels"]["top"].size:
            return obs
        return {**obs, "pixels": {**obs["pixels"], "top": self.frame()}}


def render_only_top(env: Any) -> TopCamera:
    """Make the task render the `top` camera alone (the observation gym-aloha returns is unchanged), and
    keep the camera as `env.unwrapped.top_camera`."""
    aloha = env.unwrapped
    task = aloha._env.task
    camera = aloha.top_camera = TopCamera(aloha)

    def get_observation(physics: Any) -> dict[str, Any]:
        return {
            "qpos": task.get_qpos(physics),
            "qvel": task.get_qvel(physics),
            "env_state": task.get_env_state(physics),
            "images": {"top": camera.EMPTY if camera.lazy else camera.frame(physics)},
        }

    task.get_observation = get_observation
    return camera


def policy_request(obs: dict[str, Any], cameras: list[Camera], prompt: str | None) -> dict[str, Any]:
    """A gym-aloha observation -> the request a policy server takes (the client's flat dict). A camera
    the policy may go without (openpi's ALOHA wrists) is left out when gym-aloha has none."""
    images = {}
    for camera in cameras:
        name = camera.key.removeprefix(IMAGE_PREFIX)
        name = CAMERA_ALIASES.get(name, name)
        if name in obs["pixels"]:
            if not obs["pixels"][name].size:
                raise SimError(f"camera {name!r} was not rendered for this observation (TopCamera.lazy)")
            images[camera.key] = obs["pixels"][name]
        elif not camera.optional:
            raise SimError(f"the policy wants camera {camera.key!r}; gym-aloha gives {sorted(obs['pixels'])}")
    state = np.asarray(obs["agent_pos"], dtype=np.float32)
    return Observation(images, state, prompt=prompt).to_dict()

"""MP4 of an episode as the policy saw it, with step, reward and the request's latency written on it."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import numpy as np

from sim.env import FPS
from sim.harness import EpisodeResult, Step


class EpisodeVideo:
    """An `EpisodeWatcher` for `run_episodes`: the episodes of one run follow each other in one file."""

    def __init__(self, path: Path, fps: int = FPS) -> None:
        import imageio.v2 as imageio
        from PIL import ImageFont

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.writer = imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1)
        self.font = ImageFont.load_default(size=18)
        self.episode = 0

    def new_episode(self, seed: int) -> None:
        self.episode += 1
        self.seed = seed

    def __call__(self, step: Step) -> None:
        from PIL import Image, ImageDraw

        frame = Image.fromarray(np.asarray(step.observation["pixels"]["top"]))
        draw = ImageDraw.Draw(frame)
        text = f"seed {self.seed}  step {step.index:3d}  reward {step.reward:.0f}  latency {step.latency_ms:6.1f} ms"
        draw.rectangle((0, 0, frame.width, 28), fill=(0, 0, 0))
        draw.text((8, 4), text, fill=(255, 255, 255), font=self.font)
        self.writer.append_data(np.asarray(frame))

    def end_episode(self, result: EpisodeResult) -> None:
        """Nothing to do: the next episode follows in the same file."""

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> EpisodeVideo:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

"""LeRobot 0.5 and 0.6 pi0 and pi0.5 checkpoints: config.json, model.safetensors (transformers 5: the
language model's `embed_tokens` stored apart from an untied, unused `lm_head`) and the processor pipelines,
read step by step by `lerobot_pipelines` through the conventions set `lerobot-0.6` (images padded with 0
before `x * 2 - 1`, pi0.5's prompt state with the robot's dims), with LeRobot 0.5.1's relative actions:
`relative_actions_processor` and `absolute_actions_processor`, enabled, give the bundle a delta action mask
relative to the raw state.
"""

from __future__ import annotations

from exporter.readers.lerobot_pipelines import LeRobotVersion
from runtime.bundle.conventions import LEROBOT_06

FORMAT = "lerobot-0.6"
SOURCE = "lerobot"
OPTIONS: tuple[str, ...] = ()  # `load` takes none
VERSION = LeRobotVersion(FORMAT, LEROBOT_06, relative_actions=True, after_04=True)
detect, load = VERSION.detect, VERSION.load

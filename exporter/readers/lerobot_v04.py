"""LeRobot 0.4 pi0 and pi0.5 checkpoints: config.json, model.safetensors (the token embedding stored only as
the tied `lm_head`) and the processor pipelines, read step by step by `lerobot_pipelines` through the
conventions set `lerobot-0.4`. LeRobot 0.4.4 has no numeric relative/delta action step for these policies
(its `map_delta_action_*` steps rename robot action keys on the robot side), so none is known.
"""

from __future__ import annotations

from exporter.readers.lerobot_pipelines import LeRobotVersion
from runtime.bundle.conventions import LEROBOT_04

FORMAT = "lerobot-0.4"
SOURCE = "lerobot"
OPTIONS: tuple[str, ...] = ()  # `load` takes none
VERSION = LeRobotVersion(FORMAT, LEROBOT_04, relative_actions=False, after_04=False)
detect, load = VERSION.detect, VERSION.load

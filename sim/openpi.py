"""openpi-client's own robot-side pieces, unchanged, behind the harness's policy surface: its
`WebsocketClientPolicy` talks to the daemon's openpi websocket endpoint and its `ActionChunkBroker` hands
out one action per control tick, asking the server every `action_horizon` ticks, exactly as openpi's
ALOHA examples drive `serve_policy.py`. The observation goes as openpi's ALOHA robot code sends it
(`images` by openpi's camera names, CHW; `state`; `prompt`), with the harness's `seed` (an extra the
daemon's openpi endpoint takes), so that an episode repeats exactly here too."""

from __future__ import annotations

from typing import Any

import numpy as np

from pi0_client.metadata import Metadata
from pi0_client.protocol import IMAGE_PREFIX, PROMPT, SEED, STATE
from runtime.daemon.openpi_compat import CAMERA_ALIASES
from sim.errors import SimError

# gym-aloha's (and LeRobot's) camera name -> openpi's, as openpi's examples/aloha_sim sends it.
OPENPI_CAMERA = {lerobot: openpi for openpi, lerobot in CAMERA_ALIASES.items()}


class OpenpiClientPolicy:
    def __init__(self, address: str, action_horizon: int | None = None) -> None:
        from openpi_client.action_chunk_broker import ActionChunkBroker
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        host, _, port = address.rpartition(":")
        self.remote = WebsocketClientPolicy(host, int(port))
        self.meta = Metadata.from_dict(self.remote.get_server_metadata())
        horizon = action_horizon or self.meta.chunk_size
        if not 1 <= horizon <= self.meta.chunk_size:
            raise SimError(f"--actions-per-chunk {horizon}: the policy's chunks hold {self.meta.chunk_size}")
        self.broker = ActionChunkBroker(self.remote, horizon)

    def metadata(self) -> Metadata:
        return self.meta

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Our flat request (HxWx3 frames by feature name) -> openpi's ALOHA observation -> one action."""
        images = {}
        for key, frame in obs.items():
            if isinstance(frame, np.ndarray) and frame.ndim == 3 and key not in (STATE,):
                name = key.removeprefix(IMAGE_PREFIX)
                images[OPENPI_CAMERA.get(name, name)] = np.ascontiguousarray(frame.transpose(2, 0, 1))
        request = {"images": images, "state": np.asarray(obs[STATE], np.float32)}
        for name in (PROMPT, SEED):
            if obs.get(name) is not None:
                request[name] = obs[name]
        return {"actions": np.asarray(self.broker.infer(request)["actions"])[None]}

    def reset(self) -> None:
        self.broker.reset()

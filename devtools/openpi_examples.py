"""openpi's own `examples/aloha_sim` client, unchanged, against a daemon's websocket: success per seed.

Its `env.py` (gym-aloha, every frame resized to 224x224 with openpi's centered letterbox, `cam_high`, no
prompt) is imported from an openpi checkout as it is, and run as its `main.py` runs it: openpi-client's
`Runtime` at 50 Hz with a `PolicyAgent` over an `ActionChunkBroker` (action_horizon 10) over a
`WebsocketClientPolicy`. Only the video saver is left out, for a subscriber that reads the episode's max
reward (4: transferred) when it ends.

    .venv/bin/python -m devtools.openpi_examples --openpi-src build/openpi-src --port 8000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(openpi_src: Path, host: str, port: int, seed: int, task: str, action_horizon: int) -> float:
    sys.path.insert(0, str(openpi_src / "examples" / "aloha_sim"))
    import env as _env  # openpi's examples/aloha_sim/env.py
    from openpi_client import action_chunk_broker
    from openpi_client import websocket_client_policy as _websocket_client_policy
    from openpi_client.runtime import runtime as _runtime
    from openpi_client.runtime import subscriber as _subscriber
    from openpi_client.runtime.agents import policy_agent as _policy_agent

    environment = _env.AlohaSimEnvironment(task=task, seed=seed)
    rewards: list[float] = []

    class EpisodeReward(_subscriber.Subscriber):
        """The episode's max reward, read when it ends (`Runtime.run` resets the environment after)."""

        def on_episode_start(self) -> None:
            pass

        def on_step(self, observation: dict, action: dict) -> None:
            pass

        def on_episode_end(self) -> None:
            rewards.append(float(environment._episode_reward))

    runtime = _runtime.Runtime(
        environment=environment,
        agent=_policy_agent.PolicyAgent(
            policy=action_chunk_broker.ActionChunkBroker(
                policy=_websocket_client_policy.WebsocketClientPolicy(host=host, port=port),
                action_horizon=action_horizon,
            )
        ),
        subscribers=[EpisodeReward()],
        max_hz=50,
    )
    runtime.run()
    return rewards[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openpi-src", type=Path, required=True, help="an openpi checkout (its examples/aloha_sim)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="gym_aloha/AlohaTransferCube-v0")
    parser.add_argument("--action-horizon", type=int, default=10, help="the example's default")
    args = parser.parse_args(argv)
    successes = 0
    for seed in args.seeds:
        reward = run(args.openpi_src, args.host, args.port, seed, args.task, args.action_horizon)
        successes += reward == 4
        print(f"seed {seed}: max reward {reward:g} ({'transferred' if reward == 4 else 'not transferred'})", flush=True)
    print(f"{successes} of {len(args.seeds)} transferred")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load on the daemon (`make load`): concurrent clients against `pi0-runtime serve` on the pi0-dummy
bundle, counting every reply (actions, `busy`, other errors) so that a lost request shows, with the
latency of each kind and the daemon's RSS before and after.

Clients as `devtools.load.bench_load` runs them (`busy` -> wait 5 ms, send the next; no reply in 60 s
-> lost). The daemon runs with its default queue (4 waiting).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `make load` runs this file by its path

from benchmarks.cli import main
from devtools.load import bench_load
from devtools.supervise import Daemon
from pi0_client.client import PolicyClient
from runtime.pipeline.observation import Observation

PROMPT = "transfer the cube"
SMOKE = {"clients": 2, "requests": 3, "soak": 4, "validate": False}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def run(clients: int = 16, requests: int = 500, soak: int = 10_000, validate: bool = True) -> dict:
    """`validate`: the bundle's own check against PyTorch (the smoke leaves it out: it is not what is loaded)."""
    exe = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        bundle, endpoint = Path(tmp) / "bundle", f"ipc://{tmp}/policy.sock"
        export = [exe / "pi0-export", "bundle", "--preset", "pi0-dummy", "--out", bundle, "--prompt", PROMPT]
        subprocess.run(export + ([] if validate else ["--no-validate"]), check=True, capture_output=True)
        daemon = Daemon.serve(bundle, endpoint=endpoint, quiet=True).start()
        try:
            with PolicyClient(endpoint, timeout_s=60) as probe:
                synthetic = Observation.synthetic(probe.metadata())
            obs = Observation(synthetic.images, synthetic.state, prompt=PROMPT).to_dict()
            pid = daemon.process.pid
            rss = {"start": rss_mib(pid)}
            load = bench_load(endpoint, obs, clients, requests)
            rss["after_load"] = rss_mib(pid)
            soak_run = bench_load(endpoint, obs, 2, soak // 2)  # two clients: the engine is always busy
            rss["after_soak"] = rss_mib(pid)
        finally:
            code = daemon.stop(timeout_s=60)
    return {"load": load, "soak": soak_run, "rss_mib": rss, "daemon_exit": code}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="per client")
    parser.add_argument("--soak", type=int, default=10_000, help="requests of the RSS run")
    main(run, SMOKE, parser)

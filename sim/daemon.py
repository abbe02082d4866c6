"""A policy server in a child process, supervised the way systemd does it: the daemon on a bundle
(`pi0-runtime serve`) or the scripted oracle (`pi0-sim oracle-serve`), both `runtime.server.Server`.

It is started with `$NOTIFY_SOCKET` pointing at a socket we listen on; it is ready when it sends
READY=1 (for the daemon: bundle verified, warm-up done), and it is stopped with SIGTERM and must exit 0.
Its log goes to our stdout, as it would to the journal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from sim.env import SimError


class PolicyService:
    def __init__(
        self, module: str, args: list[str], endpoint: str | None = None, ready_timeout_s: float = 300.0
    ) -> None:
        """`python -m <module> <args> --endpoint E`; E defaults to an ipc socket in a private directory."""
        self.workdir = tempfile.TemporaryDirectory(prefix="pi0-sim-")
        self.endpoint = endpoint or f"ipc://{self.workdir.name}/policy.sock"
        self.command = [sys.executable, "-m", module, *args, "--endpoint", self.endpoint]
        self.name = f"python -m {module} {args[0]}"
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.exit_code: int | None = None

    @classmethod
    def daemon(cls, bundle: Path, backend: str | None = None, endpoint: str | None = None) -> PolicyService:
        return cls(
            "runtime.cli", ["serve", "--bundle", str(bundle)] + (["--backend", backend] if backend else []), endpoint
        )

    @classmethod
    def oracle(cls, endpoint: str | None = None) -> PolicyService:
        return cls("sim.cli", ["oracle-serve"], endpoint)

    def start(self) -> PolicyService:
        notify_path = os.path.join(self.workdir.name, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.2)
        self.process = subprocess.Popen(self.command, env={**os.environ, "NOTIFY_SOCKET": notify_path})
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    if b"READY=1" in notify.recv(4096):
                        return self
                except TimeoutError:
                    if self.process.poll() is not None:
                        raise SimError(
                            f"{self.name} exited with {self.process.returncode} before it was ready"
                        ) from None
            self.stop()
            raise SimError(f"{self.name} was not ready within {self.ready_timeout_s:.0f} s")
        finally:
            notify.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait for the exit (the daemon finishes a reply in flight first)."""
        if self.process is not None and self.exit_code is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.exit_code = self.process.wait()
        self.workdir.cleanup()
        return self.exit_code if self.exit_code is not None else 0

    def __enter__(self) -> PolicyService:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        code = self.stop()
        if code != 0 and kind is None:
            raise SimError(f"{self.name} exited with {code} on SIGTERM; expected a clean 0")

"""A policy daemon in a child process, supervised the way systemd does it: for the sim, the benchmarks
and the tests, one way of starting a daemon and knowing it is ready.

The child is started with `$NOTIFY_SOCKET` pointing at a datagram socket we bind; it is ready when it
sends READY=1 (for `pi0-runtime serve`: bundle verified, warm-up done). Everything it sends there is kept
in `messages` (WATCHDOG=1, STATUS=...). It is stopped with SIGTERM, and a clean stop exits 0. Its log goes
to our stdout, as to the journal, or with `quiet` to a file (`log_path`, shown when it fails).
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


class DaemonError(RuntimeError):
    """The daemon did not come up, or did not stop cleanly."""


class Daemon:
    def __init__(
        self,
        command: list[str],
        endpoint: str | None = None,
        *,
        quiet: bool = False,
        env: dict[str, str] | None = None,
        watchdog_usec: int | None = None,
        ready_timeout_s: float = 300.0,
    ) -> None:
        """`command` is run with `--endpoint E` appended; E defaults to an ipc socket in a private directory."""
        self.workdir = tempfile.TemporaryDirectory(prefix="pi0-daemon-")
        self.endpoint = endpoint or f"ipc://{self.workdir.name}/policy.sock"
        self.command = [*command, "--endpoint", self.endpoint]
        self.name = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command[:4]))
        self.log_path = Path(self.workdir.name) / "daemon.log" if quiet else None
        self.env = {
            k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
        }
        if watchdog_usec is not None:
            self.env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.ready_timeout_s = ready_timeout_s
        self.messages: list[str] = []
        self.process: subprocess.Popen | None = None
        self.notify: socket.socket | None = None
        self.exit_code: int | None = None

    @classmethod
    def serve(cls, bundle: Path, *args: str, endpoint: str | None = None, **options: object) -> Daemon:
        """`pi0-runtime serve --bundle B ARGS...` with this interpreter."""
        return cls([sys.executable, "-m", "runtime.cli", "serve", "--bundle", str(bundle), *args], endpoint, **options)

    def start(self, wait_ready: bool = True) -> Daemon:
        notify_path = os.path.join(self.workdir.name, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(0.1)
        out = open(self.log_path, "w") if self.log_path else None  # noqa: SIM115 (the child keeps it)
        try:
            self.process = subprocess.Popen(
                self.command,
                env={**self.env, "NOTIFY_SOCKET": notify_path},
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out is not None:
                out.close()
        if wait_ready:
            self.wait_for("READY=1", self.ready_timeout_s)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def read_notify(self, timeout: float) -> list[str]:
        """Collect what the daemon sends for `timeout` seconds; returns all messages so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._receive()
        return self.messages

    def wait_for(self, message: str, timeout: float = 60.0) -> list[str]:
        """Wait until the daemon sends a message containing `message`; DaemonError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received = self._receive()
            if received is not None and message in received:
                return self.messages
            if received is None and self.process is not None and self.process.poll() is not None:
                raise DaemonError(f"{self.name} exited with {self.process.returncode}\n{self.log()}")
        self.stop()
        raise DaemonError(f"{self.name}: no {message!r} within {timeout:.0f} s; got {self.messages}\n{self.log()}")

    def _receive(self) -> str | None:
        """One message, or None after a short wait without one."""
        assert self.notify is not None
        try:
            message = self.notify.recv(4096).decode()
        except TimeoutError:
            return None
        self.messages.append(message)
        return message

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
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return self.exit_code if self.exit_code is not None else 0

    def __enter__(self) -> Daemon:
        return self.start() if self.process is None else self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        code = self.stop()
        self.workdir.cleanup()
        if code != 0 and kind is None:
            raise DaemonError(f"{self.name} exited with {code} on SIGTERM; expected a clean 0")

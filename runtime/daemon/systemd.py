"""Living under systemd: sd_notify for a `Type=notify` service (the protocol itself: one datagram per
message to the unix socket named by $NOTIFY_SOCKET; '@' means the abstract namespace), logging to stdout
for the journal, and restarting the unit after a bundle change.

The notify socket is opened once and kept: sd_notify(3) opens one per message, which fails once a flood
of connections has taken every descriptor the unit allows (LimitNOFILE=), and a watchdog ping that
cannot be sent gets a healthy daemon killed."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("pi0-runtime")
SERVICE = "pi0-runtime.service"


def setup_logging() -> None:
    """Log lines to stdout; under systemd without a timestamp (journald stamps the time itself)."""
    under_systemd = "INVOCATION_ID" in os.environ
    fmt = "%(levelname)s %(message)s" if under_systemd else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stdout)


def restart_service(unit: str = SERVICE) -> bool:
    """`systemctl restart` (a Type=notify unit: it returns once the daemon sent READY=1, or failed)."""
    if not Path("/run/systemd/system").is_dir():
        log.warning("systemd is not running here: restart %s yourself to serve the new bundle", unit)
        return True
    result = subprocess.run(["systemctl", "restart", unit], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("systemctl restart %s failed: %s", unit, result.stderr.strip())
        return False
    log.info("%s restarted and ready", unit)
    return True


_notify_socket: socket.socket | None = None


def notify(message: str) -> bool:
    """Send e.g. "READY=1", "WATCHDOG=1", "STATUS=...", "STOPPING=1". False when not under systemd or
    when the message could not be sent."""
    global _notify_socket
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        if _notify_socket is None:
            _notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Never wait: the serving loop sends these, and a reader that falls behind (a full socket) must
        # not stall it. systemd reads at once; a dropped ping only makes the next one count.
        _notify_socket.sendto(message.encode(), socket.MSG_DONTWAIT, address)
    except OSError:  # BlockingIOError included
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process (its advice for the ping period), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2

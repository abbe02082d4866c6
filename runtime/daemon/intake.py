"""What one request may cost the daemon before any of its checks run, stated and enforced.

libzmq reads a whole multipart message into memory before handing over its first frame, so the
protocol's own limits (checked after) cannot bound what a client makes the daemon allocate. What can:
- `ZMQ_MAXMSGSIZE`: libzmq drops the connection of a peer that announces a larger frame, before it
  allocates it. Per frame, derived from the bundle: every camera at a generous resolution (twice its
  trained size, at least 1920x1080), uint8, plus headroom; configurable (`max_frame_bytes`).
- the request as a whole (`max_request_bytes`: every camera's frame plus 1 MiB for the rest), checked
  before a request is queued, so the queue holds at most `queue_size` of them;
- frames beyond what a request can have are released as they are read, never kept;
- receive/send high-water marks, so libzmq queues little per peer.
libzmq cannot bound the number of frames in one message: a client that sends many frames, each under
the frame limit, makes libzmq hold them all until the message is complete. That residue is what the
unit's MemoryMax= fences (docs/reliability.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

from pi0_client import protocol
from pi0_client.metadata import Metadata
from runtime.backends import Capabilities
from runtime.errors import ApplianceError

GENEROUS_HW = (1080, 1920)  # every camera may send at least full HD
HEADROOM = 2**20
REQUEST_FRAMES = 1 + protocol.MAX_ARRAYS  # header + arrays
RCVHWM = 4  # complete messages libzmq queues per peer before it stops reading from it
SNDHWM = 16  # replies queued per peer that does not read them (then ROUTER drops them)


def camera_frame_limit(metadata: Metadata) -> int:
    """The largest image frame accepted: each camera at max(2x its trained size, full HD), HxWx3 uint8."""
    largest = 0
    for camera in metadata.cameras:
        _, h, w = camera.shape
        largest = max(largest, max(2 * h, GENEROUS_HW[0]) * max(2 * w, GENEROUS_HW[1]) * 3)
    return min(largest + HEADROOM, protocol.MAX_FRAME_BYTES)


@dataclass(frozen=True)
class Intake:
    """The daemon's limits on incoming requests and the memory they may take on top of its baseline."""

    max_frame_bytes: int
    max_request_bytes: int
    queue_size: int

    @classmethod
    def for_metadata(cls, metadata: Metadata, queue_size: int, max_frame_bytes: int | None = None) -> Intake:
        frame = max_frame_bytes or camera_frame_limit(metadata)
        return cls(frame, len(metadata.cameras) * frame + HEADROOM, queue_size)

    @property
    def budget_bytes(self) -> int:
        """Requests held at once: the queue and the one in flight (each up to max_request_bytes), plus
        one message being read (up to REQUEST_FRAMES frames of max_frame_bytes)."""
        return (self.queue_size + 1) * self.max_request_bytes + REQUEST_FRAMES * self.max_frame_bytes

    def describe(self) -> str:
        mib = 2**20
        return (
            f"frames up to {self.max_frame_bytes / mib:.1f} MiB, requests up to {self.max_request_bytes / mib:.1f} MiB, "
            f"{self.queue_size} queued: at most {self.budget_bytes / mib:.0f} MiB of requests held"
        )


def _libc_trim() -> ctypes._CFuncPtr | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_trim()


def give_back_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim). A burst of connections leaves
    many small blocks freed but still counted in RSS; the serving loop calls this once per interval
    after refusals, so RSS comes back to its level before the burst."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def cgroup_memory_max(proc_self: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory.max of this process's cgroup (v2; systemd's MemoryMax=), or None when unbounded."""
    try:
        relative = next(line.split("::", 1)[1] for line in proc_self.read_text().splitlines() if line.startswith("0::"))
        value = (root / relative.strip().lstrip("/") / "memory.max").read_text().strip()
    except (OSError, StopIteration):
        return None
    return None if value == "max" else int(value)


class MemoryBoundError(ApplianceError):
    """The service's memory bound cannot hold what the backend would load."""


def check_memory_for(weights_bytes: int, backend: str, capabilities: Capabilities, limit: int | None) -> None:
    """Refuse to start a backend that holds the weights in RAM (`Capabilities.weights_in_host_memory`:
    onnxruntime) under a memory bound they cannot fit: the kernel would kill the daemon while it loads,
    and systemd restart it, again and again."""
    fits = limit is None or weights_bytes * 1.25 + 512 * 2**20 <= limit
    if fits or not capabilities.weights_in_host_memory:
        return
    raise MemoryBoundError(
        f"the {backend} backend holds this bundle's {weights_bytes / 2**30:.1f} GiB of weights in RAM, and the "
        f"service may use {limit / 2**30:.1f} GiB (MemoryMax=); raise it: `systemctl edit pi0-runtime`, "
        "[Service] MemoryHigh= and MemoryMax= (docs/deploy.md)"
    )

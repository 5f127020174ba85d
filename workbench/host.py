"""What a worker says about itself and its machine in its hello: versions, host, memory. No torch.

Shared by the engine's jobs (``workbench.jobs``) and the fake worker
(``workbench.backends.fake``).
"""

from __future__ import annotations

import os
import platform
import socket

from workbench import __version__
from workbench.history import workbench_home

def human_bytes(n: float | None) -> str:
    """A size in bytes for people: 512 B, 3.2 MiB, 1.5 GiB."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of the machine's memory."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def process_rss() -> int | None:
    """This process's resident memory in bytes (None where /proc cannot tell)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def host_device() -> dict:
    """The host as an entry of ``devices``: its memory now, and (``process``) the worker's own resident memory."""
    total, free = host_memory()
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "total": total, "free": free,
            "process": process_rss()}


def base_hello() -> dict:
    """The hello fields every kind of worker sends (the worker loop adds the protocol version); ``devices`` starts with the host."""
    return {
        "workbench": __version__,
        "python": platform.python_version(),
        "torch": None,
        "transformers": None,
        "devices": [host_device()],
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "home": str(workbench_home()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "fake": False,
    }


__all__ = ["host_memory", "host_device", "base_hello", "human_bytes"]

"""Peak memory of a benchmark's child process, read the way that stays true for a child."""

from __future__ import annotations

import re
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux's VmHWM). Not `ru_maxrss`: that one survives exec, so a child
    started by a big parent would report the parent's size."""
    found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError("no VmHWM in /proc/self/status: peak memory is read on Linux only")
    return int(found.group(1)) / 1024

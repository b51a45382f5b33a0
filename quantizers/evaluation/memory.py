"""Resident memory of this process, for per-method peak-RSS figures.

Each benchmarked variant runs in its own process, so its peak is not inflated
by variants measured before it. Within that process, the kernel's high-water
mark (VmHWM) is reset between phases (Linux `clear_refs` value 5), so the
quantisation peak and the serving peak are measured separately, and freed heap
pages are handed back with glibc's malloc_trim first so that memory the float
weights occupied before quantisation is not counted as the quantised model's.
On systems without these facilities the figures are None rather than wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Highest resident set size since the process started or the last reset."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def release_free_memory() -> None:
    """Collect garbage and return free heap pages to the OS."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Restart the high-water mark from the current RSS; False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True

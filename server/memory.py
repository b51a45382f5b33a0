"""Giving freed memory back to the operating system.

Quantising loads the float model, copies it and builds the variant: hundreds
of MB of temporaries that Python and torch free but glibc's allocator keeps in
its arenas, so the server's RSS stays at the build's peak. `malloc_trim`
returns free arena pages (also those in the middle of a heap, since glibc 2.8).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("quantserve")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)


_LIBC = _libc()


def release_freed_memory() -> bool:
    """Collect garbage, then hand free heap pages back; False where that is not glibc."""
    gc.collect()
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True

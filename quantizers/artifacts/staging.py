"""Temporary directories inside the store, and the clean-up of dead writers' ones.

Every write and every removal goes through a directory under `<root>/tmp`, on
the same filesystem as the artifacts, so committing is a single atomic rename
and a half-written or half-deleted artifact is only ever visible there. The
directory name starts with the owner's pid: a store that opens later removes
the ones whose owner is gone (killed mid-write) and leaves live writers alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def new_temp_dir(tmp_root: Path, purpose: str) -> Path:
    """A fresh directory named `<pid>-<purpose>-<random>`."""
    path = tmp_root / f"{os.getpid()}-{purpose}-{secrets.token_hex(6)}"
    path.mkdir()
    return path


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie counts as dead: it will
    never finish its write)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def owner_pid(path: Path) -> int | None:
    prefix = path.name.split("-", 1)[0]
    return int(prefix) if prefix.isdigit() else None


def remove_stale_temp_dirs(tmp_root: Path) -> list[Path]:
    """Remove temp dirs whose owning process is gone; return what was removed."""
    removed = []
    for path in sorted(tmp_root.iterdir()):
        pid = owner_pid(path)
        if pid is not None and (pid == os.getpid() or process_alive(pid)):
            continue
        remove_tree(path)
        removed.append(path)
    if removed:
        logger.info("removed %d stale temporary artifact dir(s) in %s", len(removed), tmp_root)
    return removed


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree; a path already gone is not an error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

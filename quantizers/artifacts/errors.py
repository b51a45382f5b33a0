"""Errors raised by the artifact store."""

from __future__ import annotations

import errno as errno_codes


class ArtifactWriteError(OSError):
    """Writing an artifact failed; nothing of it was left in the store.

    A subclass of OSError carrying the original errno, so a caller can tell a
    full disk (`disk_full`) from a permission problem and report it without
    parsing messages.
    """

    def __init__(self, key: str, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"cannot write artifact {key[:12]}: {reason}")
        self.key = key

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT)

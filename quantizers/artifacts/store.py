"""A content-addressed, size-limited, crash-safe store of quantised artifacts.

Layout under the root directory:

    objects/<key>/manifest.json + tensors-NNNNN.safetensors   committed artifacts
    tmp/<pid>-<purpose>-<random>/                             writes and removals in progress
    quarantine/<key>-<ns>/                                    artifacts that failed verification

Only a directory that reached `objects/` by one atomic rename after all its
files were fsynced is ever read, and every read re-verifies each file against
the manifest's sha256, so neither a crash nor a bit flip can make the server
run a damaged model. Recency of use is the directory's mtime, so LRU order
survives restarts without a separate index that could itself be torn.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

import torch

from quantizers.artifacts.artifact import Artifact, ArtifactInfo
from quantizers.artifacts.errors import ArtifactWriteError
from quantizers.artifacts.keys import file_sha256, is_valid_key
from quantizers.artifacts.manifest import (
    MANIFEST_NAME,
    STORE_FIELDS,
    ManifestError,
    build_manifest,
    file_entries,
)
from quantizers.artifacts.staging import new_temp_dir, remove_stale_temp_dirs, remove_tree
from quantizers.artifacts.writing import (
    check_extra_names,
    fsync_directory,
    write_durably,
    write_tensors,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 << 30


class ArtifactStore:
    """Thread-safe store; one instance per process and root directory.

    The counters `hits`, `misses`, `evictions` and `corrupt` only grow; the
    server exports them as Prometheus counters. A corrupt artifact found by
    `get` counts as both `corrupt` and a `miss`, because the caller rebuilds it.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int | None = None,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        keep_quarantined: int = 4,
    ) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 or None")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_shard_bytes = max_shard_bytes
        self.keep_quarantined = keep_quarantined
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.corrupt = 0
        self._lock = threading.RLock()
        self._last_touch_ns = 0
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._quarantine = self.root / "quarantine"
        for directory in (self._objects, self._tmp, self._quarantine):
            directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(self._tmp)
        self.evict()

    def get(self, key: str) -> Artifact | None:
        """The verified artifact for `key`, or None (absent, malformed key, or
        corrupt — then it is moved to quarantine so the caller's rebuild can
        take its place)."""
        if not is_valid_key(key):
            return None
        return self._lookup(key, count=True)

    def put(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        *,
        extra_files: Mapping[str, bytes] | None = None,
        protected: Set[str] = frozenset(),
    ) -> Artifact:
        """Write an artifact atomically and return it.

        `manifest` is the caller's content (key inputs, plan, config, quality…);
        the store adds the file list, checksums, sizes and library versions.
        `extra_files` (plain names → bytes, e.g. tokenizer files) are written
        beside the tensors and verified like them.
        On any I/O failure (a full disk included) the partial write is removed
        and ArtifactWriteError is raised; committed artifacts are untouched.
        After the commit, least-recently-used artifacts are evicted to respect
        `max_bytes`, never this one nor any key in `protected`.
        """
        if not is_valid_key(key):
            raise ValueError(f"not an artifact key: {key!r}")
        if not tensors:
            raise ValueError("an artifact needs at least one tensor")
        clashes = sorted(set(manifest) & set(STORE_FIELDS))
        if clashes:
            raise ValueError(f"manifest fields reserved for the store: {', '.join(clashes)}")
        json.dumps(manifest, allow_nan=False)
        extra_files = dict(extra_files or {})
        check_extra_names(extra_files, MANIFEST_NAME)
        existing = self._lookup(key, count=False)
        if existing is not None:
            return existing
        staging = self._write_staging(key, tensors, manifest, extra_files)
        return self._commit(key, staging, protected)

    def delete(self, key: str) -> bool:
        """Remove an artifact; False when there was none."""
        if not is_valid_key(key):
            return False
        with self._lock:
            return self._remove_committed(key)

    def evict(self, protected: Set[str] = frozenset()) -> list[str]:
        """Evict least-recently-used artifacts until the store fits `max_bytes`;
        return the evicted keys."""
        if self.max_bytes is None:
            return []
        with self._lock:
            entries = sorted(
                (self._last_used_ns(path), path.name, _directory_bytes(path))
                for path in self._committed_dirs()
            )
            total = sum(size for _, _, size in entries)
            evicted = []
            for _, key, size in entries:
                if total <= self.max_bytes:
                    break
                if key in protected or not self._remove_committed(key):
                    continue
                total -= size
                evicted.append(key)
                self.evictions += 1
                logger.info("evicted artifact %s (%d bytes) to stay under %d bytes",
                            key[:12], size, self.max_bytes)
            if total > self.max_bytes:
                logger.warning("artifact store holds %d bytes over its limit of %d: "
                               "only protected artifacts are left", total, self.max_bytes)
            return evicted

    def total_bytes(self) -> int:
        """Bytes of all committed artifacts on disk."""
        with self._lock:
            return sum(_directory_bytes(path) for path in self._committed_dirs())

    def list(self) -> list[ArtifactInfo]:
        """All committed artifacts, most recently used first.

        Reads manifests without verifying payloads; an artifact whose manifest
        cannot be read is still listed (with no method) so it can be deleted.
        """
        with self._lock:
            infos = [self._info(path) for path in self._committed_dirs()]
        return sorted(infos, key=lambda info: info.last_used, reverse=True)

    def info(self, key: str) -> ArtifactInfo | None:
        """The listing entry of one artifact (unverified), or None."""
        if not is_valid_key(key):
            return None
        with self._lock:
            directory = self._objects / key
            return self._info(directory) if directory.is_dir() else None

    def _lookup(self, key: str, *, count: bool) -> Artifact | None:
        with self._lock:
            directory = self._objects / key
            if not directory.is_dir():
                self._count_miss(count)
                return None
            try:
                manifest = _verified_manifest(directory, key)
            except ManifestError as exc:
                self._quarantine_corrupt(key, str(exc))
                self._count_miss(count)
                return None
            self._touch(directory)
            if count:
                self.hits += 1
            return Artifact(key=key, path=directory, manifest=manifest)

    def _count_miss(self, count: bool) -> None:
        if count:
            self.misses += 1

    def _write_staging(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        extra_files: dict[str, bytes],
    ) -> Path:
        """Write every file into a fresh temp dir; on failure leave nothing behind."""
        staging: Path | None = None
        try:
            staging = new_temp_dir(self._tmp, "write")
            entries = write_tensors(staging, tensors, key, self.max_shard_bytes)
            entries += [write_durably(staging / name, data) for name, data in extra_files.items()]
            full = build_manifest(key, manifest, entries, created=time.time())
            write_durably(staging / MANIFEST_NAME, json.dumps(full, indent=1).encode())
            fsync_directory(staging)
        except OSError as exc:
            if staging is not None:
                remove_tree(staging)
            logger.error("writing artifact %s failed: %s", key[:12], exc)
            raise ArtifactWriteError(key, exc) from exc
        except BaseException:
            if staging is not None:
                remove_tree(staging)
            raise
        return staging

    def _commit(self, key: str, staging: Path, protected: Set[str]) -> Artifact:
        """Publish a staged artifact with one rename, then enforce the size limit."""
        with self._lock:
            final = self._objects / key
            try:
                os.rename(staging, final)
            except OSError as exc:
                remove_tree(staging)
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    winner = self._lookup(key, count=False)
                    if winner is not None:
                        return winner
                raise ArtifactWriteError(key, exc) from exc
            try:
                fsync_directory(self._objects)
            except OSError as exc:
                logger.warning("could not fsync %s after committing %s: %s",
                               self._objects, key[:12], exc)
            self._touch(final)
            manifest = json.loads((final / MANIFEST_NAME).read_text())
            self.evict(frozenset(protected) | {key})
            return Artifact(key=key, path=final, manifest=manifest)

    def _remove_committed(self, key: str) -> bool:
        """Move out of `objects/` first (atomic), then delete at leisure, so a
        removal interrupted by a crash never leaves a partial artifact behind."""
        source = self._objects / key
        if not source.is_dir():
            return False
        doomed = new_temp_dir(self._tmp, "delete")
        try:
            os.rename(source, doomed / key)
        except FileNotFoundError:
            return False
        finally:
            remove_tree(doomed)
        return True

    def _quarantine_corrupt(self, key: str, reason: str) -> None:
        self.corrupt += 1
        destination = self._quarantine / f"{key}-{time.time_ns()}"
        try:
            os.rename(self._objects / key, destination)
        except OSError as exc:
            logger.error("corrupt artifact %s (%s) could not be quarantined (%s); removing it",
                         key[:12], reason, exc)
            self._remove_committed(key)
            return
        logger.warning("corrupt artifact %s: %s; moved to %s", key[:12], reason, destination)
        self._prune_quarantine()

    def _prune_quarantine(self) -> None:
        """Keep only the newest quarantined artifacts: enough to investigate a
        fault, never enough to fill the disk when a disk keeps corrupting."""
        by_age = sorted(self._quarantine.iterdir(), key=lambda p: p.name.rsplit("-", 1)[-1])
        for old in by_age[: max(0, len(by_age) - self.keep_quarantined)]:
            remove_tree(old)

    def _touch(self, directory: Path) -> None:
        """Mark as just used; strictly increasing so LRU order is total even
        when two uses fall into the same clock tick."""
        now = max(time.time_ns(), self._last_touch_ns + 1)
        self._last_touch_ns = now
        os.utime(directory, ns=(now, now))

    def _committed_dirs(self) -> list[Path]:
        return [
            path for path in self._objects.iterdir() if path.is_dir() and is_valid_key(path.name)
        ]

    @staticmethod
    def _last_used_ns(directory: Path) -> int:
        return directory.stat().st_mtime_ns

    def _info(self, directory: Path) -> ArtifactInfo:
        try:
            manifest = json.loads((directory / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            manifest = {}
        if not isinstance(manifest, dict):
            manifest = {}
        return ArtifactInfo(
            key=directory.name,
            method=manifest.get("method"),
            config=manifest.get("config"),
            bytes=_directory_bytes(directory),
            created=float(manifest.get("created", 0.0)),
            last_used=self._last_used_ns(directory) / 1e9,
            quality=manifest.get("quality"),
        )


def _verified_manifest(directory: Path, key: str) -> dict[str, Any]:
    """The manifest, after checking every file's size and sha256 against it."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ManifestError("manifest is not a JSON object")
    for entry in file_entries(manifest, key):
        path = directory / entry.name
        try:
            size = path.stat().st_size
            if size != entry.bytes:
                raise ManifestError(
                    f"{entry.name} has {size} bytes, the manifest says {entry.bytes} (truncated?)"
                )
            if file_sha256(path) != entry.sha256:
                raise ManifestError(f"{entry.name} does not match its sha256")
        except OSError as exc:
            raise ManifestError(f"{entry.name} cannot be read: {exc}") from exc
    return manifest


def _directory_bytes(directory: Path) -> int:
    total = 0
    for path in directory.iterdir():
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total

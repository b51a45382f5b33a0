"""The JSON manifest written beside an artifact's tensors.

The manifest is the artifact's table of contents and its proof of integrity:
it lists every payload file with its size and sha256, so a reader can tell a
complete artifact from a truncated or bit-flipped one before loading a byte of
it, and it records what the artifact was built from and with (key inputs,
library versions, quality report) so an operator can judge it without
rebuilding it.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass
from typing import Any

MANIFEST_NAME = "manifest.json"
STORE_FORMAT = 1

# Fields the store writes itself; a caller's manifest may not set them.
STORE_FIELDS = ("key", "store_format", "created", "files", "bytes", "library_versions")

_VERSIONED_LIBRARIES = ("torch", "safetensors", "transformers", "quantserve")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent with the artifact."""


@dataclass(frozen=True)
class FileEntry:
    """One payload file as the manifest records it."""

    name: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that wrote the artifact, for diagnosing an
    artifact that loads differently after an upgrade."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(
    key: str, content: dict[str, Any], files: list[FileEntry], created: float
) -> dict[str, Any]:
    """Merge the caller's content with the fields only the store may set."""
    clashes = sorted(set(content) & set(STORE_FIELDS))
    if clashes:
        raise ValueError(f"manifest fields reserved for the store: {', '.join(clashes)}")
    return {
        **content,
        "key": key,
        "store_format": STORE_FORMAT,
        "created": created,
        "files": {entry.name: entry.to_dict() for entry in files},
        "bytes": sum(entry.bytes for entry in files),
        "library_versions": library_versions(),
    }


def file_entries(manifest: dict[str, Any], key: str) -> list[FileEntry]:
    """The payload files a manifest promises, after checking its own consistency.

    Raises ManifestError naming the first inconsistency, so the quarantine log
    says what was wrong rather than only that something was.
    """
    if manifest.get("key") != key:
        raise ManifestError(f"manifest key {manifest.get('key')!r} does not match the directory")
    if manifest.get("store_format") != STORE_FORMAT:
        raise ManifestError(f"unsupported store format {manifest.get('store_format')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError("manifest lists no files")
    entries = []
    for name, entry in files.items():
        valid_name = isinstance(name, str) and "/" not in name and name not in ("", ".", "..")
        if not valid_name or name == MANIFEST_NAME:
            raise ManifestError(f"manifest names an invalid file {name!r}")
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest entry for {name} is not an object")
        size, digest = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or not isinstance(digest, str):
            raise ManifestError(f"manifest entry for {name} lacks bytes or sha256")
        entries.append(FileEntry(name=name, bytes=size, sha256=digest))
    if manifest.get("bytes") != sum(entry.bytes for entry in entries):
        raise ManifestError("manifest total bytes disagree with its file list")
    return entries

"""Durable writes of an artifact's files into a directory.

Each file is fsynced before the directory is renamed into place, so after a
power cut the renamed directory never points at data still sitting in the page
cache. The sha256 recorded in the manifest is computed from the very bytes
written, not re-read, so a write error cannot be certified as valid content.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save

from quantizers.artifacts.manifest import FileEntry

SHARD_PATTERN = "tensors-{index:05d}.safetensors"
SHARD_PREFIX = "tensors-"
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_shard(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(".safetensors")


def check_extra_names(names: Iterable[str], reserved: str) -> None:
    """Extra files sit beside the shards and the manifest: plain names only,
    none that could be mistaken for either."""
    for name in names:
        if not _EXTRA_NAME.fullmatch(name) or name == reserved or name.startswith(SHARD_PREFIX):
            raise ValueError(f"invalid extra file name {name!r}")


def write_durably(path: Path, data: bytes) -> FileEntry:
    """Create `path` (it must not exist), write `data`, fsync it."""
    with path.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return FileEntry(name=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors into groups of at most `max_shard_bytes` (a single larger
    tensor gets a shard of its own), so no serialised buffer held in memory is
    bigger than one shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_tensors(
    directory: Path, tensors: dict[str, torch.Tensor], key: str, max_shard_bytes: int
) -> list[FileEntry]:
    """Write tensors as one or more safetensors files into `directory`."""
    entries = []
    for index, group in enumerate(shard(tensors, max_shard_bytes)):
        data = save(group, metadata={"artifact_key": key})
        entries.append(write_durably(directory / SHARD_PATTERN.format(index=index), data))
    return entries

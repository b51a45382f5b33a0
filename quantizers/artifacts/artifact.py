"""What the store hands out: a verified artifact, and a cheap listing entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from quantizers.artifacts.writing import is_shard


@dataclass(frozen=True)
class Artifact:
    """An artifact whose files matched their manifest checksums when handed out."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        return int(self.manifest["bytes"])

    def load_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """All tensors of the artifact, merged across its shard files."""
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(filter(is_shard, self.manifest["files"])):
            tensors.update(load_file(self.path / name, device=str(device)))
        return tensors

    def has_file(self, name: str) -> bool:
        """Whether the artifact holds (verified) extra file `name`."""
        return name in self.manifest["files"] and not is_shard(name)


@dataclass(frozen=True)
class ArtifactInfo:
    """One line of `ArtifactStore.list()`: read from the manifest, not verified,
    so listing a large cache stays instant."""

    key: str
    method: str | None
    config: dict[str, Any] | None
    bytes: int
    created: float
    last_used: float
    quality: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "method": self.method,
            "config": self.config,
            "bytes": self.bytes,
            "created": self.created,
            "last_used": self.last_used,
            "quality": self.quality,
        }

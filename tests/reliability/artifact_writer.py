"""A process that writes one large artifact into a store, to be killed mid-write.

Run as `python artifact_writer.py <cache-dir> <key>`: it writes 16 shards of
16 MiB each, slowly enough (fsync per shard) that a test can SIGKILL it while
files are half on disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from quantizers.artifacts import ArtifactStore

SHARD_BYTES = 16 << 20
SHARDS = 16


def main(cache_dir: str, key: str) -> None:
    store = ArtifactStore(Path(cache_dir), max_shard_bytes=SHARD_BYTES)
    tensors = {f"w{i}": torch.full((SHARD_BYTES // 4,), float(i)) for i in range(SHARDS)}
    store.put(key, tensors, {"note": "written by the kill test"})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""A process SIGKILLed while it writes an artifact leaves nothing a later store
(or server) would read: the half-written files sit in `tmp/`, are removed on
the next open, and the key can be written again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quantizers.artifacts import ArtifactStore
from tests.helpers.server_process import REPO_ROOT

pytestmark = pytest.mark.slow  # a writer process of 256 MiB, killed mid-write

KEY = "ab" * 32


def partial_files(tmp_dir: Path) -> list[Path]:
    return [path for path in tmp_dir.rglob("*") if path.is_file() and path.stat().st_size > 0]


def test_kill_during_an_artifact_write_leaves_no_half_artifact(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    writer = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "reliability" / "artifact_writer.py"),
         str(cache), KEY], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        while not (cache / "tmp").exists() or not partial_files(cache / "tmp"):
            assert writer.poll() is None, "the writer finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -9
    assert partial_files(cache / "tmp"), "the kill landed mid-write"
    assert not (cache / "objects" / KEY).exists()

    store = ArtifactStore(cache)
    assert list((cache / "tmp").iterdir()) == [], "the dead writer's files are cleaned up"
    assert store.get(KEY) is None
    assert store.list() == []
    written = store.put(KEY, {"w": torch.arange(8.0)}, {"note": "second try"})
    assert store.get(KEY) is not None
    assert written.manifest["note"] == "second try"

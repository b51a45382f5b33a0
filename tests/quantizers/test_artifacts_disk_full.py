"""A full disk during a write: typed error, no partial artifact, old ones intact.

The disk is real: a 2 MiB tmpfs mounted inside a private mount namespace
(`unshare --user --map-root-user --mount`), so the write fails with a genuine
ENOSPC from the kernel and the mount vanishes with the child process. The
test is skipped where the host forbids mount namespaces.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CANNOT_MOUNT = 77

CHILD = textwrap.dedent(
    f"""
    import json, subprocess, sys
    import torch
    from pathlib import Path
    from quantizers.artifacts import ArtifactStore, ArtifactWriteError, artifact_key

    disk = Path(sys.argv[1])
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        sys.exit({CANNOT_MOUNT})
    store = ArtifactStore(disk / "cache")
    small_key = artifact_key("0" * 64, "small", {{}}, None, 1)
    small = {{"w": torch.arange(1000, dtype=torch.int32)}}
    store.put(small_key, small, {{"method": "small"}})
    report = {{}}
    try:
        store.put(artifact_key("0" * 64, "huge", {{}}, None, 1),
                  {{"w": torch.ones(4 << 20, dtype=torch.int8)}}, {{"method": "huge"}})
        report["raised"] = None
    except ArtifactWriteError as exc:
        report.update(raised=type(exc).__name__, errno=exc.errno, disk_full=exc.disk_full,
                      is_oserror=isinstance(exc, OSError))
    report["tmp_entries"] = sorted(p.name for p in (disk / "cache" / "tmp").iterdir())
    report["artifacts"] = [info.method for info in store.list()]
    survivor = store.get(small_key)
    report["small_intact"] = survivor is not None and torch.equal(survivor.load_tensors()["w"],
                                                                 small["w"])
    retry_key = artifact_key("0" * 64, "retry", {{}}, None, 1)
    report["retry_ok"] = store.put(retry_key, small, {{"method": "retry"}}).key == retry_key
    report["corrupt"] = store.corrupt
    print(json.dumps(report))
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is not installed")
def test_full_disk_raises_typed_error_and_keeps_existing_artifacts(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    child = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount",
         sys.executable, "-c", CHILD, str(disk)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    if child.returncode == CANNOT_MOUNT or "Operation not permitted" in child.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {child.stderr.strip()}")
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["raised"] == "ArtifactWriteError"
    assert report["errno"] == 28 and report["disk_full"] and report["is_oserror"]
    assert report["tmp_entries"] == [], "the partial write was removed"
    assert report["artifacts"] == ["small"], "no half artifact, the old one kept"
    assert report["small_intact"]
    assert report["retry_ok"], "the space of the failed write was given back"
    assert report["corrupt"] == 0

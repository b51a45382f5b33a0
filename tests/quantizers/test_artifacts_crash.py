"""A writer killed with SIGKILL mid-write leaves nothing that the store would load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from quantizers.artifacts import ArtifactStore, artifact_key

REPO_ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from pathlib import Path
    from quantizers.artifacts import ArtifactStore, artifact_key

    store = ArtifactStore(Path(sys.argv[1]))
    big = {"w": torch.ones(16 << 20, dtype=torch.int8), "s": torch.ones(4 << 20)}
    store.put(artifact_key("0" * 64, "committed", {}, None, 1), {"w": torch.ones(8)}, {})
    print("committed", flush=True)
    for index in range(1000):
        big["s"][0] = index
        store.put(artifact_key("0" * 64, "inflight", {"i": index}, None, 1), big, {})
    """
)


def partial_writes(tmp_root: Path) -> list[Path]:
    return [path for path in tmp_root.glob("*-write-*/*") if path.stat().st_size > 0]


def test_sigkill_during_write_leaves_nothing_loadable(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "committed"
        deadline = time.monotonic() + 60
        while not partial_writes(root / "tmp"):
            assert time.monotonic() < deadline, "the writer never started a write"
            assert writer.poll() is None, "the writer exited early"
            time.sleep(0.001)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    leftovers = list((root / "tmp").iterdir())
    assert leftovers, "the kill landed mid-write, so a temp dir must be left behind"

    store = ArtifactStore(root)
    assert list((root / "tmp").iterdir()) == [], "stale temp dirs are cleaned on open"
    committed = store.get(artifact_key("0" * 64, "committed", {}, None, 1))
    assert committed is not None and committed.load_tensors()["w"].sum() == 8
    for info in store.list():
        assert store.get(info.key) is not None, "every committed artifact verifies"
    assert store.corrupt == 0


def test_temp_dirs_of_live_writers_are_kept(tmp_path: Path) -> None:
    ArtifactStore(tmp_path)
    live = tmp_path / "tmp" / f"{os.getppid()}-write-abc"
    own = tmp_path / "tmp" / f"{os.getpid()}-write-def"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = tmp_path / "tmp" / f"{int(finished.stdout)}-write-ghi"
    stray = tmp_path / "tmp" / "not-a-pid"
    for path in (live, own, dead, stray):
        path.mkdir()
        (path / "tensors-00000.safetensors").write_bytes(b"partial")
    ArtifactStore(tmp_path)
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted([live.name, own.name])

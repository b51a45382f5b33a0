"""Real `quantserve serve` processes on the tiny test model, for the reliability tests.

Like tests/helpers/server_process.running_server, but the command line is
ours: the fault tests run tests/reliability/faulty_server.py (which adds a
failing quantisation method), and the bind-address test leaves `--host` out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.server_process import REPO_ROOT, ServerProcess, free_port, wait_ready

API_KEY = "rel-api-key-5f1c9a"
ADMIN_TOKEN = "rel-admin-token-8d2e7b"
MODEL_ID = "tiny"
API_AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def tiny_env(model_dir: Path, cache_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a server on the tiny model with a fresh cache and no tokens.

    One torch thread: on a shared 2-core box more threads oversubscribe the
    cores and a tiny model's latency grows a hundredfold. Log level info, as
    the tests read the request and drain log lines (CI sets warning)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUANTSERVE_API_KEY", "QUANTSERVE_ADMIN_TOKEN", "QUANTSERVE_HOST")}
    return {**env, "QUANTSERVE_MODEL": str(model_dir), "QUANTSERVE_MODEL_ID": MODEL_ID,
            "QUANTSERVE_DTYPE": "float32", "QUANTSERVE_CACHE_DIR": str(cache_dir),
            "QUANTSERVE_NUM_THREADS": "1", "QUANTSERVE_LOG_LEVEL": "info", **extra}


@contextmanager
def server_process(
    tmp_dir: Path,
    env: Mapping[str, str],
    *,
    faulty: bool = False,
    host: str | None = "127.0.0.1",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 120.0,
) -> Iterator[ServerProcess]:
    """A ready server, stopped with SIGTERM when the block ends."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    entry = ([str(REPO_ROOT / "tests" / "reliability" / "faulty_server.py")] if faulty
             else ["-m", "server.cli"])
    host_args = ["--host", host] if host is not None else []
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *entry, "serve", *host_args, "--port", str(port), *extra_args],
            cwd=REPO_ROOT, env={**env, "PYTHONPATH": str(REPO_ROOT)}, stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process=process, port=port, log_path=log_path)
    try:
        wait_ready(server, ready_timeout)
        yield server
    finally:
        server.stop()

"""bench/load_test.py against a live tiny-model server: below the queue limit
nothing fails; above it the excess gets 429 with Retry-After and still nothing
fails; `/health` answers throughout and memory returns near its baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.server_process import REPO_ROOT, ServerProcess
from tests.reliability.serving import server_process, tiny_env

pytestmark = pytest.mark.slow  # real server processes (tiny model)

MAX_QUEUE = 4
RSS_SLACK_BYTES = 48 << 20


@pytest.fixture(scope="module")
def loaded_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("load")
    env = tiny_env(tiny_model, tmp / "cache", QUANTSERVE_MAX_QUEUE=str(MAX_QUEUE),
                   QUANTSERVE_MAX_BATCH="2")
    with server_process(tmp, env) as server:
        yield server


def run_load_script(server: ServerProcess, tmp_path: Path, clients: int,
                    duration_s: float) -> dict[str, Any]:
    out = tmp_path / f"load-{clients}.json"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "load_test.py"), "--base-url",
         server.base_url, "--pid", str(server.process.pid), "--clients", str(clients),
         "--duration", str(duration_s), "--max-tokens", "16", "--json", str(out)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
    )
    summary = json.loads(out.read_text())
    print(f"\n{clients} clients x {duration_s}s: {summary}")
    assert server.process.poll() is None
    return summary


def assert_healthy_throughout(summary: dict[str, Any]) -> None:
    assert summary["health_failures"] == 0
    assert summary["health_checks"] >= summary["duration_s"], "about one answer a second or more"
    assert summary["rss_after_bytes"] - summary["rss_before_bytes"] < RSS_SLACK_BYTES


def test_below_the_queue_limit_nothing_fails(
    loaded_server: ServerProcess, tmp_path: Path
) -> None:
    summary = run_load_script(loaded_server, tmp_path, clients=MAX_QUEUE - 1, duration_s=4)
    assert summary["failures"] == 0, summary["failure_kinds"]
    assert summary["overloaded"] == 0
    assert summary["ok"] == summary["requests"] > 10
    assert_healthy_throughout(summary)


def test_above_the_queue_limit_excess_gets_429_with_retry_after(
    loaded_server: ServerProcess, tmp_path: Path
) -> None:
    summary = run_load_script(loaded_server, tmp_path, clients=8 * MAX_QUEUE, duration_s=4)
    assert summary["failures"] == 0, summary["failure_kinds"]
    assert summary["overloaded"] > 0
    assert summary["overloaded_with_retry_after"] == summary["overloaded"]
    assert summary["ok"] > 0
    assert_healthy_throughout(summary)


@pytest.mark.nightly
def test_soak_memory_returns_to_baseline(loaded_server: ServerProcess, tmp_path: Path) -> None:
    summary = run_load_script(loaded_server, tmp_path, clients=MAX_QUEUE - 1, duration_s=120)
    assert summary["failures"] == 0, summary["failure_kinds"]
    assert summary["rss_growth_per_request_bytes"] < 2048, "no per-request leak"
    assert_healthy_throughout(summary)

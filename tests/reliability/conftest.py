"""Servers on the tiny test model shared by the reliability tests.

`served` has both tokens and tight limits, so fuzzed requests are answered
fast (a fuzzed `max_tokens` above 8 is refused before any work is queued);
`open_server` has no tokens and the default bind address, for the access
tests. Each is started once per session: a start costs ~10 s on 2 cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.server_process import ServerProcess
from tests.helpers.tiny_model_dir import write_tiny_model
from tests.reliability.serving import ADMIN_TOKEN, API_KEY, server_process, tiny_env

MAX_COMPLETION_TOKENS = 8
MAX_BODY_BYTES = 64 * 1024
OPEN_REQUEST_TIMEOUT_S = 0.05


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("reliability-model") / "model")


@pytest.fixture(scope="session")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("served")
    env = tiny_env(tiny_model, tmp / "cache", QUANTSERVE_API_KEY=API_KEY,
                   QUANTSERVE_ADMIN_TOKEN=ADMIN_TOKEN,
                   QUANTSERVE_MAX_COMPLETION_TOKENS=str(MAX_COMPLETION_TOKENS),
                   QUANTSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES), QUANTSERVE_MAX_BATCH="4")
    with server_process(tmp, env) as server:
        yield server


@pytest.fixture(scope="session")
def open_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """No tokens, no --host flag (the default bind address), a short generation limit."""
    tmp = tmp_path_factory.mktemp("open")
    env = tiny_env(tiny_model, tmp / "cache",
                   QUANTSERVE_REQUEST_TIMEOUT_S=str(OPEN_REQUEST_TIMEOUT_S))
    with server_process(tmp, env, host=None) as server:
        yield server


@pytest.fixture
def http(served: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        yield client

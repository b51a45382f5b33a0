"""One real server on the embedded model, shared by the API tests of a session
(loading SmolLM2 takes ~20 s on 2 cores, so it is started once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers.server_process import ServerProcess, running_server

API_KEY = "test-key-123"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("served")
    with running_server(tmp, env={"QUANTSERVE_API_KEY": API_KEY}) as server:
        yield server


@pytest.fixture
def client(served: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)

"""Schemathesis against quantserve's own OpenAPI schema and the official OpenAI
spec (filtered to the routes quantserve implements): no 5xx, OpenAI error
bodies on every 4xx, responses valid against the schema.

CI runs a few examples per operation; `make test-nightly` runs the
`nightly` variants with many more. Two edits to the official spec, both
outside what it says about requests and responses: `GET /chat/completions`
(listing stored completions, which quantserve does not keep) is left out, and
`seed`'s int64 bounds, written there as strings, are given as numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from schemathesis import openapi
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers.server_process import ServerProcess
from tests.reliability.fuzzing import FuzzTally, fuzz_schema, status_summary
from tests.reliability.serving import ADMIN_AUTH, API_AUTH, MODEL_ID

pytestmark = pytest.mark.slow  # real server processes (tiny model)

CI_EXAMPLES = 12
NIGHTLY_EXAMPLES = 300
OPENAI_SPEC = Path(__file__).resolve().parents[1] / "data" / "openapi" / (
    "openai-python.openapi.transformed.yml")
OPENAI_PATHS = {"/completions": {"post"}, "/chat/completions": {"post"}, "/models": {"get"}}


def headers_for(path: str) -> dict[str, str]:
    return ADMIN_AUTH if path.startswith("/admin") else API_AUTH


def own_schema(server: ServerProcess) -> Any:
    document = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()
    schema = openapi.from_dict(document)
    return schema.include(path_regex=r"^/(v1|admin)/")


def openai_schema() -> Any:
    """The official spec cut down to the implemented operations (references kept)."""
    spec = yaml.safe_load(OPENAI_SPEC.read_text())
    spec["paths"] = {path: {m: op for m, op in spec["paths"][path].items() if m in methods}
                     for path, methods in OPENAI_PATHS.items()}
    spec["servers"] = [{"url": "/v1"}]
    chat = spec["components"]["schemas"]["CreateChatCompletionRequest"]["allOf"][1]
    # The spec writes seed's int64 bounds as strings, which JSON Schema rejects.
    chat["properties"]["seed"].update(minimum=-(2**63), maximum=2**63 - 1)
    return openapi.from_dict(spec)


def report(name: str, tally: FuzzTally, tmp_path: Path) -> None:
    summary = status_summary(tally)
    (tmp_path / f"{name}.json").write_text(json.dumps(summary))
    print(f"\n{name}: {summary}")
    assert not [s for s in tally.statuses if s >= 500], tally.problems
    assert tally.problems == [], "\n".join(tally.problems[:20])


def run_own(served: ServerProcess, examples: int, *, derandomize: bool) -> FuzzTally:
    return fuzz_schema(own_schema(served), served.base_url, max_examples=examples,
                       checks=[not_a_server_error, status_code_conformance,
                               content_type_conformance, response_schema_conformance],
                       headers_for=headers_for, model_id=MODEL_ID,
                       derandomize=derandomize)


def run_openai(served: ServerProcess, examples: int, *, derandomize: bool) -> FuzzTally:
    # The official spec documents only the 200 of each route, so status codes
    # are not compared; our 4xx bodies are checked for the OpenAI error shape.
    return fuzz_schema(openai_schema(), f"{served.base_url}/v1", max_examples=examples,
                       checks=[not_a_server_error, response_schema_conformance],
                       headers_for=headers_for, model_id=MODEL_ID,
                       derandomize=derandomize)


def test_own_schema_fuzz(served: ServerProcess, tmp_path: Path) -> None:
    report("own-schema", run_own(served, CI_EXAMPLES, derandomize=True), tmp_path)


def test_openai_spec_fuzz(served: ServerProcess, tmp_path: Path) -> None:
    report("openai-spec", run_openai(served, CI_EXAMPLES, derandomize=True), tmp_path)


@pytest.mark.nightly
def test_own_schema_fuzz_nightly(served: ServerProcess, tmp_path: Path) -> None:
    report("own-schema-nightly", run_own(served, NIGHTLY_EXAMPLES, derandomize=False), tmp_path)


@pytest.mark.nightly
def test_openai_spec_fuzz_nightly(served: ServerProcess, tmp_path: Path) -> None:
    report("openai-spec-nightly", run_openai(served, NIGHTLY_EXAMPLES, derandomize=False), tmp_path)

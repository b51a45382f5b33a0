"""Fixtures for the deployment checks: the repo paths and what /metrics exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.engine.types import Finish, Timings
from server.metrics import (
    record_disconnect,
    record_error,
    record_generation,
    record_quantization_job,
)
from server.observability import install_observability
from tests.server.metrics_helpers import SnapshotEngine, tiny_loaded_model

REPO = Path(__file__).resolve().parents[2]

# Sample names each metric type adds to its family name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def metrics_text() -> str:
    """A /metrics scrape after one of each recorded event, with a model loaded."""
    app = FastAPI()
    install_observability(app)
    app.state.engine = SnapshotEngine(tiny_loaded_model("deploy-check", quality={"ratio": 1.0}))
    app.state.artifact_store = None
    record_generation("/v1/completions", Finish(
        reason="stop", prompt_tokens=3, completion_tokens=2, model_id="deploy-check",
        variant="float", timings=Timings(0.001, 0.01, 0.01, 0.02, 0.03, (0.01,))))
    record_error("invalid_request_error", 400)
    record_disconnect()
    record_quantization_job("int8", "succeeded", 1.0)
    return TestClient(app).get("/metrics").text


@pytest.fixture(scope="session")
def exported_names(metrics_text: str) -> set[str]:
    """Every series name a query may use, including the families without samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        base = family.name
        names.update(base + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (bash scripts/validate_deploy.sh installs it)")
    return path

"""Request ids, the per-request JSON log line and the HTTP duration histogram."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from server.engine.types import Finish, Timings
from server.observability import LOGGER_NAME, annotate_request, install_observability
from tests.server.metrics_helpers import samples, value

STREAM_PAUSE_S = 0.15


def _finish(e2e_s: float, completion: int) -> Finish:
    return Finish(
        reason="length", prompt_tokens=5, completion_tokens=completion, model_id="obs-model",
        variant="float",
        timings=Timings(queue_s=0.001, prefill_s=0.01, decode_s=e2e_s - 0.02, ttft_s=0.02,
                        e2e_s=e2e_s, inter_token_s=(0.01, 0.03)),
    )


def _app() -> FastAPI:
    app = FastAPI()
    install_observability(app)
    versioned = APIRouter()

    @versioned.post("/things/{name}")
    def thing(name: str) -> dict[str, str]:
        return {"name": name}

    app.include_router(versioned, prefix="/v9")

    @app.get("/items/{item_id}")
    def item(item_id: int, request: Request) -> dict[str, object]:
        annotate_request(request, _finish(0.5, 3))
        annotate_request(request, _finish(0.9, 4))
        return {"item": item_id, "request_id": request.state.request_id}

    @app.get("/stream")
    def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"a", b"b"):
                yield part
                await asyncio.sleep(STREAM_PAUSE_S)
        return StreamingResponse(chunks(), media_type="text/plain")

    return app


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture()
def client() -> TestClient:
    return TestClient(_app())


@pytest.fixture()
def log_lines() -> Iterator[list[str]]:
    handler = _Lines()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_incoming_request_id_is_echoed_and_visible_to_routes(client: TestClient) -> None:
    response = client.get("/items/3", headers={"X-Request-ID": "trace-42.a"})
    assert response.headers["X-Request-ID"] == "trace-42.a"
    assert response.json()["request_id"] == "trace-42.a"


@pytest.mark.parametrize("incoming", [None, "", "has space", "x" * 129, "line\nbreak"])
def test_missing_or_unsafe_request_id_is_replaced(client: TestClient, incoming: str | None) -> None:
    headers = {} if incoming is None else {"X-Request-ID": incoming}
    first = client.get("/items/1", headers=headers).headers["X-Request-ID"]
    second = client.get("/items/1", headers=headers).headers["X-Request-ID"]
    assert first != second
    assert first != incoming and len(first) == 32 and first.isalnum()


def test_log_line_is_json_with_generation_facts(client: TestClient, log_lines) -> None:
    client.get("/items/7", headers={"X-Request-ID": "log-check"})
    line = json.loads(next(x for x in log_lines if '"log-check"' in x))
    assert line["route"] == "/items/{item_id}"
    assert line["path"] == "/items/7"
    assert line["status"] == 200
    assert line["duration_s"] > 0
    assert line["model"] == "obs-model" and line["quantization"] == "float"
    assert line["prompt_tokens"] == 10 and line["completion_tokens"] == 7
    assert line["finish_reasons"] == ["length", "length"]
    # The slowest choice's timings, without the per-gap list.
    assert line["timings"]["e2e_s"] == 0.9
    assert line["timings"]["inter_token_mean_s"] == pytest.approx(0.02)
    assert "inter_token_s" not in line["timings"]


def test_http_histogram_uses_route_templates_and_status(client: TestClient) -> None:
    before = samples(client.get("/metrics").text)
    for item in (1, 2, 3):
        client.get(f"/items/{item}")
    client.get("/items/not-a-number")
    client.get("/no/such/path/123")
    client.post("/v9/things/abc")
    after = samples(client.get("/metrics").text)

    def moved(route: str, status: str) -> float:
        name = "quantserve_http_request_duration_seconds_count"
        labels = {"route": route, "method": "GET", "status": status}
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("/items/{item_id}", "200") == 3
    assert moved("/items/{item_id}", "422") == 1
    assert moved("unmatched", "404") == 1
    name = "quantserve_http_request_duration_seconds_count"
    labels = {"route": "/v9/things/{name}", "method": "POST", "status": "200"}
    assert value(after, name, **labels) - value(before, name, **labels) == 1
    assert not any(("route", "/items/1") in labels for _, labels in after)


def test_streamed_response_is_timed_to_its_last_chunk(client: TestClient, log_lines) -> None:
    response = client.get("/stream", headers={"X-Request-ID": "stream-check"})
    assert response.text == "ab"
    assert response.headers["X-Request-ID"] == "stream-check"
    line = json.loads(next(x for x in log_lines if '"stream-check"' in x))
    assert line["duration_s"] >= 2 * STREAM_PAUSE_S


def test_metrics_format_follows_the_accept_header(client: TestClient) -> None:
    plain = client.get("/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert "quantserve_http_request_duration_seconds" in openmetrics.text

"""SIGTERM drains: requests in flight finish, new ones get 503 while the
socket stays open, and the process exits once drained."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.reliability.fuzzing import error_shape_problem
from tests.reliability.metrics_reading import metric_value
from tests.reliability.serving import MODEL_ID, server_process, tiny_env

pytestmark = pytest.mark.slow  # real server processes (tiny model)

DRAIN_TIMEOUT_S = 60
IN_FLIGHT = 6
MAX_TOKENS = 500
# How long a loaded machine may take to admit the streams or to act on SIGTERM;
# each wait ends as soon as the condition holds.
SETTLE_S = 30


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {SETTLE_S}s: {what}"
        time.sleep(0.02)


def stream_completion(base_url: str, results: list[dict], started: threading.Event) -> None:
    body = {"model": MODEL_ID, "prompt": "drain", "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                started.set()
                events.append(line.removeprefix("data: "))
    results.append({"status": response.status_code, "events": events})


def test_sigterm_finishes_in_flight_and_refuses_new_work(
    tiny_model: Path, tmp_path: Path
) -> None:
    # One sequence at a time: six streams of 500 tokens keep the drain busy for a while.
    env = tiny_env(tiny_model, tmp_path / "cache", QUANTSERVE_MAX_BATCH="1",
                   QUANTSERVE_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S))
    with server_process(tmp_path, env) as server:
        results: list[dict] = []
        started = threading.Event()
        clients = [threading.Thread(target=stream_completion,
                                    args=(server.base_url, results, started))
                   for _ in range(IN_FLIGHT)]
        for client in clients:
            client.start()
        assert started.wait(SETTLE_S), "a stream started"
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            # Every stream is in the engine (one running, the rest queued) before
            # the signal: a busy machine may not have sent them all yet.
            wait_until(lambda: metric_value(http, "quantserve_requests_running")
                       + metric_value(http, "quantserve_requests_waiting") == IN_FLIGHT,
                       "all streams admitted")
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            # The drain has begun once readiness flips; only then is new work refused.
            wait_until(lambda: http.get("/ready").status_code == 503, "/ready says 503")
            refused = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "late",
                                                         "max_tokens": 2})
            ready = http.get("/ready")
            alive = http.get("/health")
        assert refused.status_code == 503, refused.text
        assert error_shape_problem(503, refused.content) is None
        assert refused.json()["error"]["code"] == "shutting_down"
        assert ready.status_code == 503
        assert alive.status_code == 200
        assert any(client.is_alive() for client in clients), "the drain began mid-flight"

        for client in clients:
            client.join(DRAIN_TIMEOUT_S)
        server.process.wait(DRAIN_TIMEOUT_S)
        drained_in = time.monotonic() - signalled

    assert len(results) == IN_FLIGHT
    for result in results:
        assert result["status"] == 200
        assert result["events"][-1] == "[DONE]"
        usage = json.loads(result["events"][-2])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS, "every in-flight stream ran to the end"
    assert drained_in < DRAIN_TIMEOUT_S
    assert "drained in" in server.log()

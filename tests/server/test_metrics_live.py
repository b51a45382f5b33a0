"""/metrics of a real server moves by exactly what real requests served.

Uses the session's real server on the embedded model (tests/server/conftest.py)
and compares scrapes taken before and after, parsed with prometheus-client.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from tests.helpers.server_process import ServerProcess
from tests.server.conftest import API_KEY, MODEL
from tests.server.metrics_helpers import samples, value

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _scrape(server: ServerProcess) -> dict:
    response = httpx.get(f"{server.base_url}/metrics", timeout=30)
    assert response.status_code == 200
    return samples(response.text)


def _idle_scrape(server: ServerProcess, timeout: float = 120.0) -> dict:
    """A scrape once nothing runs or waits, so that work left by earlier tests on
    the shared server cannot land between this test's two scrapes."""
    deadline = time.monotonic() + timeout
    while True:
        parsed = _scrape(server)
        busy = sum(v for (name, _), v in parsed.items()
                   if name in ("quantserve_requests_running", "quantserve_requests_waiting"))
        if busy == 0 or time.monotonic() > deadline:
            return parsed
        time.sleep(0.5)


def _labels(parsed: dict, name: str) -> dict[str, str]:
    """The model labels of the served model, as the scrape reports them."""
    for sample_name, labels in parsed:
        if sample_name == name:
            return dict(labels)
    raise AssertionError(f"{name} has no sample")


def test_counters_and_histograms_move_by_what_was_served(served: ServerProcess) -> None:
    before = _idle_scrape(served)
    usages = []
    with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=120) as http:
        completion = http.post("/v1/completions", headers={"X-Request-ID": "live-metrics-1"},
                               json={"model": MODEL, "prompt": "The capital of France is",
                                     "max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 1})
        assert completion.status_code == 200, completion.text
        assert completion.headers["X-Request-ID"] == "live-metrics-1"
        usages.append((completion.json()["usage"], 2))
        chat = http.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]})
        assert chat.status_code == 200, chat.text
        usages.append((chat.json()["usage"], 1))
        bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400
    after = _scrape(served)
    labels = _labels(after, "quantserve_model_weight_bytes")
    assert labels["model"] == MODEL

    def moved(name: str, **extra: str) -> float:
        return value(after, name, **extra) - value(before, name, **extra)

    def moved_tokens(name: str) -> float:
        return sum(moved(name, endpoint=e, **labels) for e in ("completions", "chat"))

    completion_tokens = sum(u["completion_tokens"] for u, _ in usages)
    choices = sum(n for _, n in usages)
    assert moved_tokens("quantserve_generation_tokens_total") == completion_tokens
    # The prompt is prefilled once per choice.
    assert moved_tokens("quantserve_prompt_tokens_total") == sum(
        u["prompt_tokens"] * n for u, n in usages)
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"quantserve_{histogram}_seconds_count", **labels) == choices, histogram
    assert moved("quantserve_inter_token_latency_seconds_count", **labels) == (
        completion_tokens - choices)
    assert moved("quantserve_time_to_first_token_seconds_sum", **labels) > 0
    errors_400 = [labels for name, labels in after if name == "quantserve_errors_total"
                  and ("status", "400") in labels]
    assert sum(moved("quantserve_errors_total", **dict(e)) for e in errors_400) == 1
    route = {"route": "/v1/completions", "method": "POST"}
    http_count = "quantserve_http_request_duration_seconds_count"
    assert moved(http_count, status="200", **route) == 1
    assert moved(http_count, status="400", **route) == 1
    assert value(after, "quantserve_requests_running", **labels) == 0
    assert value(after, "quantserve_model_weight_bytes", **labels) > 100_000_000 // 4
    assert value(after, "process_resident_memory_bytes") > 0

    line = next(json.loads(x) for x in served.log().splitlines() if '"live-metrics-1"' in x)
    assert line["route"] == "/v1/completions" and line["status"] == 200
    assert line["completion_tokens"] == usages[0][0]["completion_tokens"]
    assert line["model"] == MODEL


def test_scrapes_stay_fast_while_generating(served: ServerProcess) -> None:
    """/metrics takes no engine lock: it answers in the middle of a generation, each
    scrape in a small fraction of the generation's time (ratios, as the CPU is shared)."""
    outcome: dict[str, float | int] = {}

    def generate() -> None:
        started = time.perf_counter()
        response = httpx.post(f"{served.base_url}/v1/completions", headers=AUTH, timeout=300,
                              json={"model": MODEL, "prompt": "1, 2, 3, 4, 5,",
                                    "max_tokens": 64, "temperature": 0})
        outcome["status"] = response.status_code
        outcome["seconds"] = time.perf_counter() - started

    worker = threading.Thread(target=generate)
    worker.start()
    durations, saw_running = [], False
    while worker.is_alive():
        started = time.perf_counter()
        parsed = _scrape(served)
        durations.append(time.perf_counter() - started)
        saw_running |= any(name == "quantserve_requests_running" and v >= 1
                           for (name, _), v in parsed.items())
        time.sleep(0.2)
    worker.join()
    assert outcome["status"] == 200
    assert saw_running, "no scrape landed while the generation was running"
    assert max(durations) < 0.25 * outcome["seconds"], (durations, outcome)


def test_promtool_accepts_the_live_scrape(served: ServerProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (bash scripts/validate_deploy.sh installs it)")
    text = httpx.get(f"{served.base_url}/metrics", timeout=30).text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr

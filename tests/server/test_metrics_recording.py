"""record_* functions move exactly the series they promise, as seen through /metrics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.engine.types import Finish, Timings
from server.metrics import (
    INTER_TOKEN_BUCKETS,
    record_disconnect,
    record_error,
    record_generation,
    record_quantization_job,
)
from server.observability import install_observability
from tests.server.metrics_helpers import samples, value


@pytest.fixture()
def scrape() -> Callable[[], dict]:
    app = FastAPI()
    install_observability(app)
    client = TestClient(app)
    return lambda: samples(client.get("/metrics").text)


def _finish(model: str, completion: int, gaps: tuple[float, ...], reason: str = "length") -> Finish:
    return Finish(
        reason=reason, prompt_tokens=7, completion_tokens=completion, model_id=model,
        variant="int8",
        timings=Timings(queue_s=0.002, prefill_s=0.03, decode_s=sum(gaps), ttft_s=0.04,
                        e2e_s=0.04 + sum(gaps), inter_token_s=gaps),
    )


def test_generation_counts_tokens_and_observes_every_latency(scrape) -> None:
    model = "recording-model"
    labels = {"model": model, "quantization": "int8"}
    before = scrape()
    record_generation("/v1/completions", _finish(model, 4, (0.003, 0.02, 0.2)))
    record_generation("/v1/chat/completions", _finish(model, 2, (0.004,), reason="stop"))
    after = scrape()

    def moved(name: str, **extra: str) -> float:
        return value(after, name, **labels, **extra) - value(before, name, **labels, **extra)

    assert moved("quantserve_generation_tokens_total", endpoint="/v1/completions") == 4
    assert moved("quantserve_generation_tokens_total", endpoint="/v1/chat/completions") == 2
    assert moved("quantserve_prompt_tokens_total", endpoint="/v1/completions") == 7
    assert moved("quantserve_choices_finished_total", endpoint="/v1/completions",
                 finish_reason="length") == 1
    assert moved("quantserve_choices_finished_total", endpoint="/v1/chat/completions",
                 finish_reason="stop") == 1
    assert moved("quantserve_inter_token_latency_seconds_count") == 4
    assert moved("quantserve_inter_token_latency_seconds_sum") == pytest.approx(0.227)
    # Each gap lands in its own bucket: 0.003 <= 0.005, 0.02 <= 0.02, 0.2 <= 0.25.
    assert moved("quantserve_inter_token_latency_seconds_bucket", le="0.0025") == 0
    assert moved("quantserve_inter_token_latency_seconds_bucket", le="0.005") == 2
    assert moved("quantserve_inter_token_latency_seconds_bucket", le="0.02") == 3
    assert moved("quantserve_inter_token_latency_seconds_bucket", le="0.15") == 3
    assert moved("quantserve_inter_token_latency_seconds_bucket", le="0.25") == 4
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time",
                 "request_prefill_time", "request_decode_time"):
        assert moved(f"quantserve_{name}_seconds_count") == 2, name
    assert moved("quantserve_time_to_first_token_seconds_sum") == pytest.approx(0.08)
    assert moved("quantserve_request_queue_time_seconds_sum") == pytest.approx(0.004)
    assert moved("quantserve_e2e_request_latency_seconds_sum") == pytest.approx(0.08 + 0.227)


def test_adapter_choices_and_tokens_are_counted_per_adapter(scrape) -> None:
    model = "lora-base"
    labels = {"model": model, "quantization": "int8"}
    before = scrape()
    record_generation("/v1/completions", _finish(model, 4, (0.01,) * 3))  # the base
    tuned = _finish(model, 5, (0.01,) * 4)
    record_generation("/v1/completions", Finish(**{**tuned.__dict__, "adapter": "sql"}))
    after = scrape()

    def moved(name: str, **extra: str) -> float:
        return value(after, name, **labels, **extra) - value(before, name, **labels, **extra)

    assert moved("quantserve_lora_choices_total", adapter="sql") == 1
    assert moved("quantserve_lora_tokens_total", adapter="sql", kind="generated") == 5
    assert moved("quantserve_lora_tokens_total", adapter="sql", kind="prompt") == 7
    assert moved("quantserve_generation_tokens_total", endpoint="/v1/completions") == 9


def test_choice_without_tokens_skips_token_latencies(scrape) -> None:
    model = "cancelled-in-queue"
    labels = {"model": model, "quantization": "int8"}
    record_generation("/v1/completions", _finish(model, 0, (), reason="cancelled"))
    after = scrape()
    assert value(after, "quantserve_request_queue_time_seconds_count", **labels) == 1
    assert value(after, "quantserve_e2e_request_latency_seconds_count", **labels) == 1
    assert value(after, "quantserve_time_to_first_token_seconds_count", **labels) == 0
    assert value(after, "quantserve_request_prefill_time_seconds_count", **labels) == 0
    assert value(after, "quantserve_choices_finished_total", endpoint="/v1/completions",
                 finish_reason="cancelled", **labels) == 1


def test_errors_disconnects_and_jobs(scrape) -> None:
    before = scrape()
    record_error("invalid_request_error", 400)
    record_error("invalid_request_error", 400)
    record_error("server_overloaded", 429)
    record_disconnect()
    record_quantization_job("gptq", "succeeded", 42.0)
    record_quantization_job("gptq", "failed", 3.0)
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("quantserve_errors_total", type="invalid_request_error", status="400") == 2
    assert moved("quantserve_errors_total", type="server_overloaded", status="429") == 1
    assert moved("quantserve_client_disconnects_total") == 1
    assert moved("quantserve_quantization_jobs_total", method="gptq", outcome="succeeded") == 1
    assert moved("quantserve_quantization_jobs_total", method="gptq", outcome="failed") == 1
    assert moved("quantserve_quantization_job_duration_seconds_sum", method="gptq",
                 outcome="succeeded") == 42.0
    assert moved("quantserve_quantization_job_duration_seconds_bucket", method="gptq",
                 outcome="succeeded", le="30.0") == 0
    assert moved("quantserve_quantization_job_duration_seconds_bucket", method="gptq",
                 outcome="succeeded", le="60.0") == 1


def test_buckets_cover_gpu_and_cpu_token_speeds() -> None:
    """A GPU token (~2 ms) and a slow CPU token (~400 ms) fall in different, finite buckets."""
    assert min(INTER_TOKEN_BUCKETS) <= 0.002
    assert any(0.25 < b <= 0.5 for b in INTER_TOKEN_BUCKETS)
    assert max(INTER_TOKEN_BUCKETS) >= 2.0

"""Prometheus metrics that the server records as work happens.

Everything lives in prometheus-client's default registry, so the standard
`process_*` series come for free and one `GET /metrics` shows it all; the server
is a single process, so no multiprocess mode is needed.

The API the rest of the server calls:

- `record_generation(endpoint, finish)`: once per finished choice, from the
  OpenAI routes. Observes TTFT, every inter-token gap, end-to-end, queue,
  prefill and decode time, and counts prompt and generated tokens, labelled
  with the model and quantisation variant that served the choice.
- `record_error(error_type, status)`: once per error response.
- `record_disconnect()`: once per client that went away mid-request.
- `record_quantization_job(method, outcome, duration_s)`: once per finished
  `/admin/quantize` job.
- `observe_http_request(route, method, status, duration_s)`: used by the HTTP
  middleware in `server.observability`.

Gauges that describe the current state (queue depth, memory, the active
model, artifact cache counters, quality) are not recorded here: they are read
at scrape time by `server.metrics_collector`, so they can never go stale.

Buckets span GPU and CPU speeds: a GPU decodes a token in a few milliseconds,
a CPU can take a few hundred on a large model, and a long CPU request runs for
minutes; each histogram covers both ends with a few buckets per decade.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, disable_created_metrics

from server.engine.types import Finish

# The text format would add a `*_created` series beside every counter and
# histogram child, doubling what each scrape stores for no dashboard use.
disable_created_metrics()

_MODEL_LABELS = ("model", "quantization")

TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)
REQUEST_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0,
    15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
QUEUE_BUCKETS = (
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0, 7200.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "quantserve_time_to_first_token_seconds",
    "Time from submission to the first generated token, per choice.",
    _MODEL_LABELS, buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "quantserve_inter_token_latency_seconds",
    "Gap between consecutive generated tokens of one choice (one observation per gap).",
    _MODEL_LABELS, buckets=INTER_TOKEN_BUCKETS,
)
E2E_LATENCY = Histogram(
    "quantserve_e2e_request_latency_seconds",
    "Time from submission to the finish of a choice.",
    _MODEL_LABELS, buckets=REQUEST_BUCKETS,
)
QUEUE_TIME = Histogram(
    "quantserve_request_queue_time_seconds",
    "Time a choice waited before it was admitted into the running batch.",
    _MODEL_LABELS, buckets=QUEUE_BUCKETS,
)
PREFILL_TIME = Histogram(
    "quantserve_request_prefill_time_seconds",
    "Time spent on the prompt forward pass of a choice.",
    _MODEL_LABELS, buckets=TTFT_BUCKETS,
)
DECODE_TIME = Histogram(
    "quantserve_request_decode_time_seconds",
    "Time spent generating tokens after the first one, per choice.",
    _MODEL_LABELS, buckets=REQUEST_BUCKETS,
)
PROMPT_TOKENS = Counter(
    "quantserve_prompt_tokens",
    "Prompt tokens prefilled (a request with n choices counts its prompt n times).",
    ("endpoint", *_MODEL_LABELS),
)
GENERATION_TOKENS = Counter(
    "quantserve_generation_tokens",
    "Tokens generated; equals the sum of usage.completion_tokens served.",
    ("endpoint", *_MODEL_LABELS),
)
CHOICES_FINISHED = Counter(
    "quantserve_choices_finished",
    "Finished choices by endpoint and finish reason (a request with n choices adds n).",
    ("endpoint", "finish_reason", *_MODEL_LABELS),
)
# Per LoRA adapter (labels bounded by what the admin loads): choices served with it
# and their tokens; base-model traffic is not counted here.
LORA_CHOICES = Counter(
    "quantserve_lora_choices",
    "Finished choices served with a LoRA adapter, by adapter.",
    ("adapter", *_MODEL_LABELS),
)
LORA_TOKENS = Counter(
    "quantserve_lora_tokens",
    "Tokens of choices served with a LoRA adapter: kind=prompt (prefilled) or generated.",
    ("adapter", "kind", *_MODEL_LABELS),
)
ERRORS = Counter(
    "quantserve_errors",
    "Error responses by error type and HTTP status.",
    ("type", "status"),
)
DISCONNECTS = Counter(
    "quantserve_client_disconnects",
    "Requests whose client went away before the response was complete.",
)
HTTP_DURATION = Histogram(
    "quantserve_http_request_duration_seconds",
    "HTTP request duration until the last body byte is sent, by route template and status.",
    ("route", "method", "status"), buckets=REQUEST_BUCKETS,
)
QUANTIZATION_JOB_DURATION = Histogram(
    "quantserve_quantization_job_duration_seconds",
    "Wall time of a quantisation job, by method and outcome.",
    ("method", "outcome"), buckets=JOB_BUCKETS,
)
QUANTIZATION_JOBS = Counter(
    "quantserve_quantization_jobs",
    "Quantisation jobs by method and outcome (e.g. succeeded, failed, cached, cancelled).",
    ("method", "outcome"),
)


def record_generation(endpoint: str, finish: Finish) -> None:
    """Record one finished choice served by `endpoint` (e.g. "/v1/completions").

    Token-dependent latencies (TTFT, prefill, decode, inter-token gaps) are
    only observed when a token was produced: a choice cancelled in the queue
    has no first token, and a zero would drag the quantiles down.
    """
    labels = (finish.model_id, finish.variant)
    timings = finish.timings
    QUEUE_TIME.labels(*labels).observe(timings.queue_s)
    E2E_LATENCY.labels(*labels).observe(timings.e2e_s)
    if finish.completion_tokens > 0:
        TIME_TO_FIRST_TOKEN.labels(*labels).observe(timings.ttft_s)
        PREFILL_TIME.labels(*labels).observe(timings.prefill_s)
        DECODE_TIME.labels(*labels).observe(timings.decode_s)
        gaps = INTER_TOKEN_LATENCY.labels(*labels)
        for gap in timings.inter_token_s:
            gaps.observe(gap)
    PROMPT_TOKENS.labels(endpoint, *labels).inc(finish.prompt_tokens)
    GENERATION_TOKENS.labels(endpoint, *labels).inc(finish.completion_tokens)
    CHOICES_FINISHED.labels(endpoint, finish.reason, *labels).inc()
    if finish.adapter is not None:
        LORA_CHOICES.labels(finish.adapter, *labels).inc()
        LORA_TOKENS.labels(finish.adapter, "prompt", *labels).inc(finish.prompt_tokens)
        LORA_TOKENS.labels(finish.adapter, "generated", *labels).inc(finish.completion_tokens)


def record_error(error_type: str, status: int) -> None:
    """Count one error response, e.g. ("invalid_request_error", 400)."""
    ERRORS.labels(error_type, str(status)).inc()


def record_disconnect() -> None:
    """Count one client that disconnected before its response was complete."""
    DISCONNECTS.inc()


def record_quantization_job(method: str, outcome: str, duration_s: float) -> None:
    """Record one finished quantisation job and how long it ran."""
    QUANTIZATION_JOBS.labels(method, outcome).inc()
    QUANTIZATION_JOB_DURATION.labels(method, outcome).observe(duration_s)


def observe_http_request(route: str, method: str, status: int, duration_s: float) -> None:
    """Observe one HTTP request; `route` is the template ("/v1/models/{model}")."""
    HTTP_DURATION.labels(route, method, str(status)).observe(duration_s)

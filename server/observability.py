"""Request ids, one JSON log line per request, HTTP metrics and `GET /metrics`.

`install_observability(app)` is the one call the app factory makes. It adds:

- an ASGI middleware that takes the request id from an incoming `X-Request-ID`
  header (when it is a short token of safe characters) or makes a new one,
  stores it as `request.state.request_id`, echoes it in the `X-Request-ID`
  response header, observes `quantserve_http_request_duration_seconds` by
  route template, method and status, and writes one JSON line to the
  `quantserve.requests` logger when the response is complete;
- the `GET /metrics` route in Prometheus text format;
- the scrape-time collector's view of `app.state` (engine, artifact store).

The middleware is pure ASGI rather than Starlette's `BaseHTTPMiddleware`: a
streamed completion is only finished when its last body chunk is sent, and
only then are its duration, tokens and timings known.

Routes add generation facts to the log line with `annotate_request(request,
finish)` once per finished choice, or by setting any of `LOG_STATE_FIELDS` on
`request.state` themselves.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.types import Finish, Timings
from server.metrics import observe_http_request
from server.metrics_collector import STATE_COLLECTOR

REQUEST_ID_HEADER = "X-Request-ID"
LOGGER_NAME = "quantserve.requests"
LOG_STATE_FIELDS = (
    "model", "adapter", "quantization", "prompt_tokens", "completion_tokens",
    "finish_reasons", "timings", "error_type",
)
UNMATCHED_ROUTE = "unmatched"

# Ids are copied into logs and headers: accept only a short run of safe
# characters, so a client cannot forge log lines or blow up label values.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

request_log = logging.getLogger(LOGGER_NAME)


def _request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID when it is safe to echo and log, else a new id."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SAFE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _route_template(scope: Scope) -> str:
    """The matched route's full path template; raw paths would make unbounded label sets.

    Recent FastAPI keeps a route of an included router under its own path
    (`/completions`) and matches the include prefix (`/v1`) separately, so
    the prefix is recovered as the part of the request path before the
    route's own pattern matches.
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return UNMATCHED_ROUTE
    pattern = getattr(route, "path_regex", None)
    path = scope.get("path", "")
    path = path.removeprefix(scope.get("root_path", "")) or path
    if pattern is None or pattern.match(path):
        return template
    for start, char in enumerate(path):
        if char == "/" and pattern.match(path[start:]):
            return path[:start] + template
    return template


def _timings_for_log(timings: Any) -> Any:
    """Timings without the per-gap list, which would make log lines grow with the output."""
    if not isinstance(timings, Timings):
        return timings
    fields = {k: round(v, 6) for k, v in asdict(timings).items() if k != "inter_token_s"}
    gaps = timings.inter_token_s
    fields["inter_token_mean_s"] = round(sum(gaps) / len(gaps), 6) if gaps else None
    return fields


def _jsonable(value: Any) -> Any:
    """Fallback for json.dumps: a route may store any object on request.state."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)


class ObservabilityMiddleware:
    """Request id, HTTP duration histogram and the JSON request log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id_from(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - start
            route = _route_template(scope)
            observe_http_request(route, scope["method"], status, duration)
            self._log(scope, state, request_id, route, status, duration)

    @staticmethod
    def _log(
        scope: Scope, state: dict[str, Any], request_id: str, route: str, status: int,
        duration: float,
    ) -> None:
        if not request_log.isEnabledFor(logging.INFO):
            return
        line: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "path": scope.get("path", ""),
            "status": status,
            "duration_s": round(duration, 6),
        }
        for field in LOG_STATE_FIELDS:
            if field in state:
                line[field] = _timings_for_log(state[field]) if field == "timings" else state[field]
        request_log.info(json.dumps(line, default=_jsonable, separators=(",", ":")))


def annotate_request(request: Request, finish: Finish) -> None:
    """Add one finished choice to the request's log line.

    Tokens add up over the choices of an `n > 1` request; the timings kept are
    those of the slowest choice, which is what the client waited for.
    """
    state = request.state
    state.model = finish.model_id
    if finish.adapter is not None:
        state.adapter = finish.adapter
    state.quantization = finish.variant
    state.prompt_tokens = getattr(state, "prompt_tokens", 0) + finish.prompt_tokens
    state.completion_tokens = getattr(state, "completion_tokens", 0) + finish.completion_tokens
    state.finish_reasons = [*getattr(state, "finish_reasons", []), finish.reason]
    kept = getattr(state, "timings", None)
    if not isinstance(kept, Timings) or finish.timings.e2e_s >= kept.e2e_s:
        state.timings = finish.timings


def metrics_response(request: Request) -> Response:
    """Every metric in the default registry, in the format the scraper accepts.

    Prometheus text 0.0.4 unless the Accept header asks for OpenMetrics. A plain
    function, so FastAPI runs it in its thread pool and a scrape never holds
    the event loop."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(REGISTRY), headers={"Content-Type": content_type})


def _ensure_json_handler() -> None:
    """Each request line is a JSON document: print the message alone, on stdout.

    Human-oriented logs (uvicorn, the engine) go to stderr, so a log shipper can
    take stdout as pure JSON lines."""
    if request_log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False


def install_observability(app: FastAPI) -> None:
    """Add the middleware and `GET /metrics` to `app`, and point the collector at its state.

    Call it from the app factory before the app starts (Starlette refuses new
    middleware afterwards). The process serves one app, so the collector
    follows the app installed last.
    """
    app.add_middleware(ObservabilityMiddleware)
    app.add_api_route("/metrics", metrics_response, methods=["GET"], include_in_schema=False)
    STATE_COLLECTOR.attach(app.state)
    _ensure_json_handler()

"""OpenAI-shaped errors: every failure a client sees is
`{"error": {"message", "type", "param", "code"}}` with the right status.

Clients written for OpenAI (and the official SDK) parse this body to raise
their typed exceptions, so even 404s for unknown routes and 500s use it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.metrics import record_error

log = logging.getLogger("quantserve.errors")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the error statuses it answers, each documented
    with the OpenAI error body and its description."""
    return {
        status: {"model": ErrorResponse, "description": description}
        for status, description in descriptions.items()
    }


class APIError(Exception):
    """Raise anywhere in a route to answer with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        fallback = "server_error" if status >= 500 else "invalid_request_error"
        self.type = type or _TYPE_BY_STATUS.get(status, fallback)
        self.headers = headers or {}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    err = APIError(status, message, param=param, code=code, type=type, headers=headers)
    return _render(err)


def _utf8(text: str | None) -> str | None:
    """A message may quote client input holding a lone surrogate, which no
    UTF-8 body can carry: replace it rather than fail the error response."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _render(err: APIError) -> JSONResponse:
    record_error(err.code or err.type, err.status)
    body = ErrorResponse(
        error=ErrorDetail(message=_utf8(err.message) or "", type=err.type,
                          param=_utf8(err.param), code=err.code)
    )
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def _is_type_tag(part: object) -> bool:
    """pydantic puts the union member it tried into `loc` (`str`, `list[int]`, ...)."""
    text = str(part)
    return text in _TYPE_TAGS or "[" in text or "-" in text


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "content")` -> `messages[0].content`."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(part):
            out += ("." if out else "") + str(part)
    return out or None


def validation_status(request: Request) -> int:
    """OpenAI answers bad parameters with 400; the admin API, like FastAPI, with 422."""
    return 422 if request.url.path.startswith("/admin") else 400


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    param = _param_of(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return error_response(400, "request body is not valid JSON", code="invalid_json")
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return error_response(validation_status(request), message, param=param, code="invalid_value")


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return _render(exc)


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _on_recursion(_: Request, __: RecursionError) -> JSONResponse:
    return error_response(400, "request body is nested too deeply", code="invalid_json")


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", type="server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RecursionError, _on_recursion)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)

"""Response plumbing shared by the OpenAI routes: SSE framing, usage,
finish reasons, and running choices while watching for a client disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel

from server.choices import ChoiceStream, until_disconnected
from server.engine.types import Finish
from server.errors import APIError, ErrorResponse
from server.schemas.openai import Usage

T = TypeVar("T")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing or invalid API key",
        404: "Unknown model",
        413: "Request body too large",
        429: "Server at capacity; retry after the Retry-After header",
        503: "Server shutting down or not ready",
    }.items()
}


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event, `data: {...}` and a blank line."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


def finish_reason(finish: Finish) -> Literal["stop", "length"]:
    """OpenAI knows only `stop` and `length`: a generation cut by the server's
    time limit ends like one cut by max_tokens (the text is complete so far)."""
    if finish.reason == "error":
        raise APIError(500, finish.error or "generation failed", type="server_error",
                       code="generation_error")
    return "stop" if finish.reason == "stop" else "length"


def usage_of(prompt_tokens: int, finishes: Sequence[Finish]) -> Usage:
    """Prompt tokens count once per prompt (not once per choice), as OpenAI does."""
    completion = sum(f.completion_tokens for f in finishes)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion)


async def run_to_completion(
    request: Request,
    stream: ChoiceStream,
    count: int,
    collector: Callable[[ChoiceStream, int], Awaitable[T]],
) -> T:
    """Collect every choice, but stop generating at once if the client leaves."""
    async with stream:
        work = asyncio.ensure_future(collector(stream, count))
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            gone.cancel()
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        request.app.state.observe_disconnect()
        raise APIError(499, "client closed the request", code="client_disconnected")

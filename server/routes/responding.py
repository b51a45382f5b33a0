"""Response plumbing shared by the OpenAI routes: SSE framing, usage,
finish reasons, and running choices while watching for a client disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.choices import ChoiceStream, until_disconnected
from server.engine.types import Finish, TokenDelta
from server.errors import APIError, ErrorDetail, ErrorResponse, error_responses
from server.metrics import record_disconnect, record_generation
from server.observability import annotate_request
from server.schemas.openai import Usage

T = TypeVar("T")

ERROR_RESPONSES = error_responses({
    400: "Invalid request",
    401: "Missing or invalid API key",
    404: "Unknown model",
    413: "Request body too large",
    429: "Server at capacity; retry after the Retry-After header",
    503: "Server shutting down or not ready",
})

# The generation routes answer `stream: true` with server-sent events: document
# that media type next to the JSON body, so schema-driven clients accept it.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"description": "The completion; with `stream: true`, server-sent events of "
                         "chunks ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
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


def record_finish(request: Request, endpoint: str, finish: Finish) -> None:
    """Metrics and the request's log line, once per finished choice."""
    record_generation(endpoint, finish)
    annotate_request(request, finish)


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


async def sse_response(
    request: Request,
    endpoint: str,
    stream: ChoiceStream,
    *,
    head: Iterable[str],
    on_delta: Callable[[int, TokenDelta], str | None],
    on_finish: Callable[[int, Finish], str],
    tail: Callable[[list[Finish]], Iterable[str]],
) -> StreamingResponse:
    """Stream the merged choices as server-sent events, ending with `[DONE]`.

    The callbacks render one chunk each. A client that leaves mid-stream makes
    Starlette close this generator; the `finally` then cancels every sequence
    still running, so the engine stops generating for nobody.
    """

    async def events() -> AsyncIterator[str]:
        finishes: list[Finish] = []
        complete = False
        try:
            for chunk in head:
                yield chunk
            async for index, event in stream.events():
                if isinstance(event, TokenDelta):
                    chunk = on_delta(index, event)
                    if chunk is not None:
                        yield chunk
                else:
                    finishes.append(event)
                    record_finish(request, endpoint, event)
                    yield on_finish(index, event)
            for chunk in tail(finishes):
                yield chunk
            complete = True
        except APIError as exc:
            complete = True
            yield sse(ErrorResponse(error=ErrorDetail(
                message=exc.message, type=exc.type, param=exc.param, code=exc.code)))
        finally:
            # Count first: when the client has left, the task is cancelled and
            # the await below raises CancelledError again before returning.
            if not complete:
                record_disconnect()
            await stream.cancel()
        yield sse_done()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


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
        record_disconnect()
        raise APIError(499, "client closed the request", code="client_disconnected")

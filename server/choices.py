"""Run the choices of one API request on the engine, together.

A request with several prompts or `n > 1` becomes several engine sequences.
They run concurrently (so the engine can batch them), and their events are
merged into one stream tagged with the choice index. Engine refusals (queue
full, shutting down) surface before the HTTP response starts, so the client
gets a proper 429 / 503 instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from server.engine.adapters import UnknownAdapter
from server.engine.types import (
    EngineOverloaded,
    EngineShuttingDown,
    Finish,
    GenerationRequest,
    TokenDelta,
    TokenLogprob,
)
from server.errors import APIError

Event = TokenDelta | Finish
GenerateFn = Callable[[GenerationRequest], AsyncIterator[Event]]

_DONE = object()


@dataclass
class ChoiceResult:
    """Everything one finished choice produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, EngineOverloaded):
        retry = max(1, round(exc.retry_after_s))
        return APIError(
            429, str(exc), code="server_overloaded", headers={"Retry-After": str(retry)}
        )
    if isinstance(exc, EngineShuttingDown):
        return APIError(503, "the server is shutting down", code="shutting_down")
    if isinstance(exc, UnknownAdapter):  # unloaded between the model check and the submit
        return APIError(404, str(exc), param="model", code="model_not_found")
    return APIError(500, "generation failed", type="server_error", code="internal_error")


class ChoiceStream:
    """Merged events of several engine sequences.

    Use as an async context manager: leaving it early (client disconnect,
    error) cancels every sequence still running, which frees their batch slots.
    """

    def __init__(self, generate: GenerateFn, requests: list[GenerationRequest]) -> None:
        self._generate = generate
        self._requests = requests
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._started: list[asyncio.Event] = []
        self._refusal: BaseException | None = None

    async def __aenter__(self) -> ChoiceStream:
        for index, request in enumerate(self._requests):
            started = asyncio.Event()
            self._started.append(started)
            self._tasks.append(asyncio.create_task(self._pump(index, request, started)))
        await asyncio.gather(*(event.wait() for event in self._started))
        if self._refusal is not None:
            await self.cancel()
            raise engine_error(self._refusal) from self._refusal
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cancel()

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pump(self, index: int, request: GenerationRequest, started: asyncio.Event) -> None:
        try:
            async with contextlib.aclosing(self._generate(request)) as events:
                async for event in events:
                    started.set()
                    await self._queue.put((index, event))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a refusal before output, or a failure the consumer maps
            if not started.is_set():
                self._refusal = exc
            await self._queue.put((index, exc))
        finally:
            started.set()
            await self._queue.put((index, _DONE))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        remaining = len(self._tasks)
        while remaining:
            index, item = await self._queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise engine_error(item) from item
            else:
                yield index, item  # type: ignore[misc]


async def collect(stream: ChoiceStream, count: int) -> list[ChoiceResult]:
    """Run every choice to the end and return their results in index order."""
    results = [ChoiceResult() for _ in range(count)]
    async for index, event in stream.events():
        result = results[index]
        if isinstance(event, TokenDelta):
            result.text += event.text
            result.token_ids.extend(event.token_ids)
            result.logprobs.extend(event.logprobs)
        else:
            result.finish = event
    return results


async def until_disconnected(receive: Callable[[], Awaitable[dict[str, object]]]) -> None:
    """Return when the client goes away (the body has already been read)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return

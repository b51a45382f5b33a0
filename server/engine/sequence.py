"""The state of one request while the engine works on it, and how its output is streamed.

The worker thread owns everything here except `cancelled`, which the consumer
side sets; a plain attribute write is atomic in CPython and the worker only
polls it between steps, so no lock is needed on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from server.engine.block_manager import Allocation, BlockManager
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.sampling import Choice, make_generator
from server.engine.stop_strings import StopMatcher
from server.engine.types import (
    Finish,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenDelta,
    TokenLogprob,
)

Sink = Callable[[TokenDelta | Finish], None]


class Sequence:
    """One request from admission to its single `Finish`."""

    def __init__(
        self, request: GenerationRequest, model: Any, sink: Sink, eos_ids: frozenset[int]
    ) -> None:
        self.request = request
        self.params = request.params
        self.model = model  # the engine's model handle this request was submitted under
        self.adapter: Any = None  # the LoRA adapter it holds (an adapters.Resident), if any
        self.sink = sink
        self.cancelled = False
        self.finished = False
        self.block_ids: list[int] = []  # its KV blocks, in token order (the block table)
        self.allocation: Allocation | None = None
        self.generator = make_generator(request.params.seed)
        self.stop_ids = frozenset(request.params.stop_token_ids) | (
            frozenset() if request.params.ignore_eos else eos_ids
        )
        self.prompt_len = len(request.prompt_ids)
        self.last_token = -1
        self.cache_len = 0  # tokens already written to this sequence's KV blocks
        self.completion_tokens = 0
        self.output_ids: list[int] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self._tokenizer = model.loaded.tokenizer
        self._detok = IncrementalDetokenizer(self._tokenizer, request.prompt_ids)
        self._stops = StopMatcher(request.params.stop)
        self._pending_ids: list[int] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self.submitted = time.perf_counter()
        self.admitted = self.submitted
        self.first_token: float | None = None
        self._last_token_time = self.submitted
        self._gaps: list[float] = []

    @property
    def blocks(self) -> BlockManager:
        return self.model.pool.blocks

    @property
    def group(self) -> Hashable:
        return self.model.version

    @property
    def prefix_namespace(self) -> Hashable:
        """An adapter changes every layer's keys and values: its prompts' blocks are its own."""
        if self.request.adapter is None:
            return self.model.version
        return (self.model.version, self.adapter_uid)

    @property
    def adapter_uid(self) -> int | None:
        return None if self.adapter is None else self.adapter.uid

    @property
    def reuse_prefix(self) -> bool:
        return not self.request.prompt_logprobs

    @property
    def preempted(self) -> bool:
        """Admitted before, its KV dropped to make room: its prefill recomputes."""
        return bool(self.output_ids)

    def prefill_tokens(self) -> list[int]:
        """What the KV must hold before the next decode step: the prompt, and
        after a preemption the output so far but its newest token (fed next)."""
        return [*self.request.prompt_ids, *self.output_ids[:-1]]

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def logprob_entry(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...]) -> (
        TokenLogprob
    ):
        alternatives = tuple((self.token_text(t), lp) for t, lp in top)
        return TokenLogprob(token_id, self.token_text(token_id), logprob, alternatives)

    def accept(self, choice: Choice, max_seq_len: int) -> FinishReason | None:
        """Take the token chosen for this sequence; stream what is ready.

        Returns why the sequence is done, or None. The caller frees the slot
        and then calls `finish`, so a consumer that sees the Finish also sees
        the slot already free.
        """
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        else:
            self._gaps.append(now - self._last_token_time)
        self._last_token_time = now
        self.completion_tokens += 1
        self.last_token = choice.token_id
        self.output_ids.append(choice.token_id)
        if choice.token_id in self.stop_ids:
            self._emit(self._stops.flush(), final=True)
            return "stop"
        self._pending_ids.append(choice.token_id)
        if choice.logprob is not None:
            self._pending_logprobs.append(
                self.logprob_entry(choice.token_id, choice.logprob, choice.top)
            )
        text = self._stops.feed(self._detok.push(choice.token_id))
        if self._stops.stopped:
            self._emit(text, final=True)
            return "stop"
        out_of_room = self.cache_len + 1 >= max_seq_len
        if self.completion_tokens >= self.params.max_tokens or out_of_room:
            text += self._stops.feed(self._detok.flush())
            if self._stops.stopped:
                self._emit(text, final=True)
                return "stop"
            self._emit(text + self._stops.flush(), final=True)
            return "length"
        self._emit(text, final=False)
        return None

    def _emit(self, text: str, *, final: bool) -> None:
        """Send released text with the tokens that produced it.

        Tokens whose text is still held back (partial character or possible
        stop string) travel with the text once it is released.
        """
        if not text and not (final and self._pending_ids):
            return
        self.sink(TokenDelta(text, tuple(self._pending_ids), tuple(self._pending_logprobs)))
        self._pending_ids.clear()
        self._pending_logprobs.clear()

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        """Send the one Finish of this sequence (idempotent)."""
        if self.finished:
            return
        self.finished = True
        now = time.perf_counter()
        first = self.first_token if self.first_token is not None else now
        timings = Timings(
            queue_s=self.admitted - self.submitted,
            prefill_s=max(0.0, first - self.admitted) if self.first_token else 0.0,
            decode_s=now - first,
            ttft_s=first - self.submitted,
            e2e_s=now - self.submitted,
            inter_token_s=tuple(self._gaps),
        )
        loaded = self.model.loaded
        self.sink(
            Finish(
                reason=reason,
                prompt_tokens=self.prompt_len,
                completion_tokens=self.completion_tokens,
                timings=timings,
                model_id=loaded.model_id,
                variant=loaded.variant,
                prompt_logprobs=self.prompt_logprobs,
                error=error,
                adapter=self.request.adapter,
            )
        )

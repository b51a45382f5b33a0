"""The data that crosses the boundary between the HTTP layer and the engine.

Routes turn OpenAI requests into a `GenerationRequest`; the engine streams back
`TokenDelta`s and exactly one final `Finish`. Nothing here knows about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error", "timeout"]


class EngineOverloaded(Exception):
    """The waiting queue is full; the route answers 429 with Retry-After."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class EngineShuttingDown(Exception):
    """The engine is draining for shutdown; the route answers 503."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling settings, honoured inside a batch."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed + same request = same text
    stop: tuple[str, ...] = ()  # stop strings; the matched stop is not returned
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS / <|im_end|>
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top-k
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_logprobs: bool = False  # also score the prompt tokens (echo + logprobs)
    timeout_s: float | None = None  # generation time limit; exceeded -> finish "timeout"
    adapter: str | None = None  # a loaded LoRA adapter's name; None: the base model


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str  # the token's own text, as OpenAI's `tokens` array shows it
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # top-k alternatives, best first


@dataclass(frozen=True)
class TokenDelta:
    """New output since the previous delta.

    `text` is already safe to show: text that might be the start of a stop
    string is held back until it is known not to be one, and incomplete UTF-8
    byte sequences are held back until complete.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Timings:
    queue_s: float  # submit -> admitted into the running batch
    prefill_s: float
    decode_s: float
    ttft_s: float  # submit -> first token produced
    e2e_s: float  # submit -> finish
    inter_token_s: tuple[float, ...] = ()  # gaps between consecutive generated tokens


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    model_id: str
    variant: str  # "float" or the quantisation method of the model that served it
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first entry None
    error: str | None = None
    adapter: str | None = None  # the LoRA adapter it ran with


@dataclass(frozen=True)
class EngineStats:
    """Read without taking any lock, so that /metrics never slows decoding."""

    running: int
    waiting: int
    kv_cache_bytes: int  # bytes of the KV blocks holding content (used or cached)
    max_batch: int  # max_num_seqs
    total_finished: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0  # held by running sequences
    kv_blocks_cached: int = 0  # held by none, kept for prefix reuse until evicted
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens whose KV was found there
    preemptions: int = 0
    extra: dict[str, float] = field(default_factory=dict)

"""The worker: owns the served model, the KV block pool and the runner calls.

The scheduler decides which sequences run; the worker runs them: a prefill
writes a newly admitted sequence's prompt (past its cached prefix) into its
blocks, a decode step advances a batch by one token. It knows nothing of
queues, sampling or streaming.

A new model (a swap) gets the current pool when its KV has the same shape, so
a variant of the served model costs no second cache; otherwise it gets a pool
of its own, and the old one is freed with the last sequence that uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from quantizers.kv_int8 import KV_CACHE_DTYPES
from quantizers.loading import LoadedModel
from server.engine.block_manager import Allocation, BlockStats
from server.engine.kv_cache import KVPool, pool_bytes
from server.engine.runner_choice import RunnerMode
from server.engine.served_model import CompileMode, ServedModel

log = logging.getLogger("quantserve.engine")


@dataclass(frozen=True)
class CacheConfig:
    """How the KV pool is sized and cut into blocks."""

    kv_cache_bytes: int | None = None  # None: a default for the device (kv_cache.pool_bytes)
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "int8" (quantizers/kv_int8.py)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"not {self.kv_cache_dtype!r}"
            )


class Running(Protocol):
    """What the worker reads of a sequence."""

    model: ServedModel
    block_ids: list[int]
    cache_len: int
    last_token: int
    allocation: Allocation | None

    @property
    def group(self) -> Hashable: ...

    @property
    def adapter_uid(self) -> int | None: ...

    def prefill_tokens(self) -> list[int]: ...


class Worker:
    def __init__(
        self, loaded: LoadedModel, *, max_num_seqs: int, max_model_len: int,
        cache: CacheConfig, compile: CompileMode = "off", runner: RunnerMode = "auto",
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.cache = cache
        self.compile: CompileMode = compile
        self.runner: RunnerMode = runner
        self.active = self.build(loaded, None)

    def build(self, loaded: LoadedModel, current: ServedModel | None) -> ServedModel:
        """A served model for `loaded` with its pool: `current`'s when shapes allow."""
        served = ServedModel(
            loaded, max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
            compile=self.compile, runner=self.runner, kv_cache_dtype=self.cache.kv_cache_dtype,
        )
        spec = served.kv_spec
        shared = current.pool if current is not None else None
        if shared is not None and shared.cache.spec == spec:
            served.pool = shared
        else:
            budget = pool_bytes(spec, self.cache.kv_cache_bytes, self.cache.gpu_memory_utilization)
            served.pool = KVPool.create(
                spec, budget_bytes=budget, block_size=self.cache.block_size,
                prefix_caching=self.cache.prefix_caching,
            )
            log.info(
                "KV cache: %d blocks of %d tokens, %s, %.1f MiB", served.pool.cache.num_blocks,
                self.cache.block_size, spec.cache_dtype if spec.cache_dtype != "auto"
                else str(spec.dtype).removeprefix("torch."), served.pool.cache.nbytes / 2**20,
            )
        capacity = served.pool.cache.num_blocks * served.pool.cache.block_size
        if capacity < served.max_seq_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, fewer than one sequence may need "
                f"(max_model_len {served.max_seq_len}); raise kv_cache_bytes or lower "
                "max_model_len"
            )
        return served

    def pools(self, models: list[ServedModel]) -> list[KVPool]:
        """The distinct pools of `models` (two only while a swap drains)."""
        found: dict[int, KVPool] = {}
        for model in models:
            if model.pool is not None:
                found[id(model.pool)] = model.pool
        return list(found.values())

    @staticmethod
    def block_stats(pools: list[KVPool]) -> BlockStats:
        stats = [p.blocks.stats() for p in pools]
        return BlockStats(
            total=sum(s.total for s in stats), used=sum(s.used for s in stats),
            cached=sum(s.cached for s in stats),
            prefix_queries=sum(s.prefix_queries for s in stats),
            prefix_hits=sum(s.prefix_hits for s in stats),
        )

    def prefill(self, sequence: Running, *, all_logits: bool) -> torch.Tensor:
        """Compute an admitted sequence's KV past its cached prefix; logits as the
        runner returns them. Its full prompt blocks are then offered for reuse."""
        allocation = sequence.allocation
        assert allocation is not None, "prefill of a sequence the scheduler did not admit"
        pool = sequence.model.pool
        assert pool is not None
        tokens = sequence.prefill_tokens()
        sequence.model.lora.state.select([sequence.adapter_uid], single=True)
        # The runner prefills chunk by chunk, so a step's activations are a
        # chunk's, not the whole prompt's.
        logits = sequence.model.runner.prefill(
            pool.cache, sequence.block_ids, tokens, start=allocation.cached_tokens,
            chunk=pool.chunk_tokens, all_logits=all_logits,
        )
        pool.blocks.publish(allocation)
        sequence.cache_len = len(tokens)
        return logits

    @staticmethod
    def packable(sequence: Running) -> int:
        """The tokens `sequence` adds to a packed prefill, or 0 if it cannot
        join one: it needs its whole prompt computed in one chunk, no adapter,
        and a runner whose projections compute rows together as alone."""
        allocation = sequence.allocation
        pool = sequence.model.pool
        if allocation is None or pool is None or sequence.adapter_uid is not None:
            return 0
        tokens = len(sequence.prefill_tokens())
        limit = min(sequence.model.runner.pack_rows, pool.chunk_tokens)
        return tokens if allocation.cached_tokens == 0 and tokens <= limit else 0

    def prefill_packed(self, batch: list[Running]) -> torch.Tensor:
        """Prefill `batch` (one model, each `packable`, together within its
        runner's `pack_rows`) in one pass; float32 logits `[B, vocab]`, each
        sequence's last prompt position's."""
        served = batch[0].model
        pool = served.pool
        assert pool is not None and all(s.allocation is not None for s in batch)
        prompts = [(s.block_ids, s.prefill_tokens()) for s in batch]
        served.lora.state.select([None], single=True)
        logits = served.runner.prefill_packed(pool.cache, prompts)
        for sequence, (_, tokens) in zip(batch, prompts, strict=True):
            assert sequence.allocation is not None
            pool.blocks.publish(sequence.allocation)
            sequence.cache_len = len(tokens)
        return logits

    def decode(self, batch: list[Running]) -> torch.Tensor:
        """One token for every sequence of `batch` (one model); float32 logits `[B, vocab]`."""
        served = batch[0].model
        pool = served.pool
        assert pool is not None
        runner = served.runner
        if served.lora.state.current is not None:
            served.lora.state.select([s.adapter_uid for s in batch], single=False)
        tokens = torch.tensor([s.last_token for s in batch], dtype=torch.long, device=runner.device)
        return runner.decode(
            pool.cache, tokens, [s.cache_len for s in batch], [s.block_ids for s in batch]
        )

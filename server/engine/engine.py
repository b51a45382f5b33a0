"""The generation engine: a worker thread running continuous batching.

Requests wait in a bounded queue. At every step the engine thread retires
finished, cancelled and timed-out sequences, lets the scheduler admit waiting
requests (seats, step token budget and free KV blocks permitting), has the
worker prefill each newcomer past its cached prefix, makes room for every
running sequence's next token (preempting the newest when the block pool is
short), then advances them all by one token in a single batched forward pass.
Tokens reach each consumer's asyncio queue as soon as they are chosen, so
streams interleave.

The split follows vLLM: `Scheduler` (pure policy), `Worker` (model, KV pool,
runner), and this class, which owns the thread, the requests and sampling. All
model work happens on the engine thread, off the event loop, so the HTTP layer
stays responsive during long generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

import torch

from quantizers.loading import LoadedModel
from quantizers.lora import LoraAdapter
from server.engine.adapters import AdapterRegistry, Resident
from server.engine.lora import AdapterMismatch
from server.engine.runner_choice import RunnerMode
from server.engine.sampling import Choice, choose_tokens, prompt_logprobs
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.served_model import CompileMode
from server.engine.types import (
    EngineOverloaded,
    EngineShuttingDown,
    EngineStats,
    Finish,
    FinishReason,
    GenerationRequest,
    TokenDelta,
    TokenLogprob,
)
from server.engine.worker import CacheConfig, Worker

log = logging.getLogger("quantserve.engine")

# How long the idle worker sleeps before re-checking queued requests' timeouts.
_IDLE_POLL_S = 0.05


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Engine:
    """Continuous-batching generation over one served model at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_num_seqs: int = 8,
        max_model_len: int = 4096,
        max_num_batched_tokens: int | None = None,
        max_queue: int = 64,
        cache: CacheConfig | None = None,
        num_threads: int | None = None,
        compile: CompileMode = "off",
        runner: RunnerMode = "auto",
        max_loras: int = 8,
        max_lora_rank: int = 64,
    ) -> None:
        batched = max_model_len if max_num_batched_tokens is None else max_num_batched_tokens
        if max_num_seqs < 1 or max_model_len < 2 or max_queue < 0 or batched < max_model_len:
            raise ValueError(
                "max_num_seqs >= 1, max_model_len >= 2, max_queue >= 0 and "
                "max_num_batched_tokens >= max_model_len required"
            )
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.num_threads = num_threads or available_cores()
        self._worker = Worker(
            loaded, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            cache=cache or CacheConfig(), compile=compile, runner=runner,
        )
        self._scheduler: Scheduler[Sequence] = Scheduler(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=batched
        )
        self._lock = threading.Lock()
        self._adapters = AdapterRegistry(max_loras)
        self.max_lora_rank = max_lora_rank
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._cancel_all = False
        self._finished_total = 0
        self._generated_total = 0
        self._prompt_total = 0
        self._decode_steps = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> float:
        """Set torch's thread count, warm the model up and start the worker.

        Returns the warm-up seconds so the caller can report them.
        """
        torch.set_num_threads(self.num_threads)
        seconds = self._worker.active.warm_up()
        self._thread = threading.Thread(target=self._run, name="quantserve-engine", daemon=True)
        self._thread.start()
        return seconds

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let running and queued sequences finish up to the
        timeout, then cancel what remains and stop the worker."""
        self._accepting = False
        if self._thread is None:
            self._cancel_pending()
            return
        self._stop = True
        self._wake.set()
        self._thread.join(drain_timeout_s)
        if self._thread.is_alive():
            self._cancel_all = True
            self._wake.set()
            self._thread.join()
        self._thread = None

    @property
    def loaded(self) -> LoadedModel:
        return self._worker.active.loaded

    def swap_model(self, loaded: LoadedModel) -> None:
        """Build and warm the new model, then make it the one new requests use.

        Requests already submitted keep the model they were submitted under;
        the scheduler drains that batch before admitting any request for the
        new one, because a batch runs one model. The new model shares the KV
        pool when its cache has the same shape.
        """
        served = self._worker.build(loaded, self._worker.active)
        served.warm_up()
        with self._lock:
            # Loaded adapters stay applied: the new variant gets them before anyone uses it.
            served.lora.apply(self._resident())
            self._worker.active = served

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> list[Resident]:
        """The loaded (selectable) LoRA adapters, least recently used first."""
        with self._lock:
            return self._adapters.listed()

    def load_adapter(self, name: str, adapter: LoraAdapter, source: str) -> list[str]:
        """Make `adapter` selectable as `name`; returns the adapters evicted for it.

        Raises `AdapterMismatch` when it does not fit the served model and
        `DuplicateAdapter` when the name is taken. Its factors join the stacks
        before the first sequence that uses it runs.
        """
        if adapter.rank > self.max_lora_rank:
            raise AdapterMismatch(
                f"the adapter's rank {adapter.rank} exceeds this server's max_lora_rank "
                f"{self.max_lora_rank}"
            )
        self._worker.active.lora.check(adapter)
        with self._lock:
            evicted = self._adapters.add(name, adapter, source)
        self._wake.set()
        return evicted

    def unload_adapter(self, name: str) -> None:
        """Unlist `name` (UnknownAdapter if not loaded); sequences using it finish with it."""
        with self._lock:
            self._adapters.remove(name)
        self._wake.set()

    def _resident(self) -> list[tuple[int, LoraAdapter]]:
        return [(r.uid, r.adapter) for r in self._adapters.resident()]

    def _sync_adapters(self) -> None:
        """Rebuild the adapter stacks of every model in use when the resident set
        changed. The caller holds the lock; runs on the engine thread, between steps."""
        if not self._adapters.changed:
            return
        self._adapters.changed = False
        resident = self._resident()
        sequences = [*self._scheduler.running, *self._scheduler.waiting]
        models = {id(s.model): s.model for s in sequences}
        models[id(self._worker.active)] = self._worker.active
        for served in models.values():
            served.lora.apply(resident)

    def _finish(
        self, sequence: Sequence, reason: FinishReason, error: str | None = None
    ) -> None:
        """Send the sequence's Finish and give its adapter back. Lock held."""
        self._finished_total += 1
        if sequence.adapter is not None:
            self._adapters.release(sequence.adapter)
            sequence.adapter = None
        sequence.finish(reason, error)

    def stats(self) -> EngineStats:
        running = list(self._scheduler.running)
        active = self._worker.active
        models = [s.model for s in running]
        pools = self._worker.pools([*models, active])
        blocks = self._worker.block_stats(pools)
        held = sum(
            (stats.used + stats.cached) * pool.block_bytes
            for pool, stats in ((p, p.blocks.stats()) for p in pools)
        )
        return EngineStats(
            running=len(running),
            waiting=len(self._scheduler.waiting),
            kv_cache_bytes=held,
            max_batch=self.max_num_seqs,
            total_finished=self._finished_total,
            kv_blocks_total=blocks.total,
            kv_blocks_used=blocks.used,
            kv_blocks_cached=blocks.cached,
            prefix_cache_queries=blocks.prefix_queries,
            prefix_cache_hits=blocks.prefix_hits,
            preemptions=self._scheduler.preemptions,
            extra={
                "generated_tokens_total": float(self._generated_total),
                "prompt_tokens_total": float(self._prompt_total),
                "decode_steps_total": float(self._decode_steps),
                "warmup_seconds": active.warmup_s,
                "compile_seconds": active.compile_s,
                "decode_compiled": float(active.compiled),
                "decode_native": float(active.decode_mode == "native"),
                "prepared_weight_bytes": float(active.runner.prepared_weight_bytes),
                "kv_pool_bytes": float(sum(p.cache.nbytes for p in pools)),
                "num_threads": float(self.num_threads),
            },
        )

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finish]:
        """Stream a request's deltas and its one Finish.

        Raises EngineShuttingDown / EngineOverloaded before yielding anything.
        Stopping iteration early cancels the sequence and frees its slot.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta | Finish] = asyncio.Queue()

        def sink(item: TokenDelta | Finish) -> None:
            # The consumer's loop may already be closed (it gave up on the
            # stream); the sequence is cancelled and there is no one to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        served = self._worker.active
        sequence = Sequence(request, served, sink, served.eos_ids)
        prompt = request.prompt_ids
        with self._lock:
            if not self._accepting:
                raise EngineShuttingDown("the server is shutting down")
            if len(self._scheduler.waiting) >= self.max_queue:
                raise EngineOverloaded(retry_after_s=1.0)
            if request.adapter is not None:
                sequence.adapter = self._adapters.acquire(request.adapter)
            if not prompt or len(prompt) >= served.max_seq_len:
                self._finish(
                    sequence, "error",
                    f"prompt has {len(prompt)} tokens; 1..{served.max_seq_len - 1} are supported",
                )
            else:
                self._scheduler.add(sequence)
        self._wake.set()
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Finish):
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                sequence.cancelled = True
                self._wake.set()

    def _cancel_pending(self) -> None:
        with self._lock:
            pending = list(self._scheduler.waiting)
            self._scheduler.waiting.clear()
            for sequence in pending:
                self._finish(sequence, "cancelled")

    # -------------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            if self._cancel_all:
                self._cancel_pending()
                for sequence in list(self._scheduler.running):
                    self._retire(sequence, "cancelled")
                return
            self._expire_waiting()
            self._retire_interrupted()
            self._admit()
            if self._scheduler.running:
                self._step()
                continue
            if self._stop and not self._scheduler.waiting:
                return
            self._wake.wait(_IDLE_POLL_S)
            self._wake.clear()

    def _interrupt_reason(self, sequence: Sequence, now: float) -> FinishReason | None:
        if sequence.cancelled:
            return "cancelled"
        timeout = sequence.request.timeout_s
        if timeout is not None and now - sequence.submitted > timeout:
            return "timeout"
        return None

    def _expire_waiting(self) -> None:
        now = time.perf_counter()
        with self._lock:
            keep: deque[Sequence] = deque()
            dropped: list[tuple[Sequence, FinishReason]] = []
            for sequence in self._scheduler.waiting:
                reason = self._interrupt_reason(sequence, now)
                if reason is None:
                    keep.append(sequence)
                else:
                    dropped.append((sequence, reason))
            self._scheduler.waiting = keep
            for sequence, reason in dropped:
                self._finish(sequence, reason)

    def _retire_interrupted(self) -> None:
        now = time.perf_counter()
        for sequence in list(self._scheduler.running):
            reason = self._interrupt_reason(sequence, now)
            if reason is not None:
                self._retire(sequence, reason)

    def _retire(self, sequence: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Give the sequence's blocks back, then send its Finish."""
        with self._lock:
            self._scheduler.retire(sequence)
            self._finish(sequence, reason, error)

    def _admit(self) -> None:
        with self._lock:
            admitted = self._scheduler.admit()
            self._sync_adapters()
        for batch in self._prefill_batches(admitted):
            if len(batch) == 1:
                self._prefill(batch[0])
            else:
                self._prefill_packed(batch)

    def _prefill_batches(self, admitted: list[Sequence]) -> list[list[Sequence]]:
        """The admitted in order, short new prompts of one model packed together
        up to its runner's `pack_rows` tokens (one pass through the weights
        instead of one per prompt), every other sequence alone."""
        batches: list[list[Sequence]] = []
        open_batch: list[Sequence] = []
        rows = 0
        for sequence in admitted:
            tokens = 0
            if not sequence.preempted and not sequence.request.prompt_logprobs:
                tokens = self._worker.packable(sequence)
            if tokens == 0:
                batches.append([sequence])
                continue
            fits = bool(open_batch) and open_batch[0].model is sequence.model
            if not fits or rows + tokens > sequence.model.runner.pack_rows:
                open_batch, rows = [], 0
                batches.append(open_batch)
            open_batch.append(sequence)
            rows += tokens
        return batches

    def _prefill_packed(self, batch: list[Sequence]) -> None:
        now = time.perf_counter()
        for sequence in batch:
            sequence.admitted = now
        try:
            logits = self._worker.prefill_packed(batch)
            choices = choose_tokens(
                logits, [s.params for s in batch], [s.generator for s in batch]
            )
        except Exception as exc:  # a broken model must fail the requests, not the worker
            log.exception("packed prefill failed for %d sequences", len(batch))
            for sequence in batch:
                self._retire(sequence, "error", str(exc))
            return
        for sequence, choice in zip(batch, choices, strict=True):
            self._first_token(sequence, choice)

    def _prefill(self, sequence: Sequence) -> None:
        recompute = sequence.preempted
        if not recompute:
            sequence.admitted = time.perf_counter()
        wants_prompt = sequence.request.prompt_logprobs and not recompute
        try:
            logits = self._worker.prefill(sequence, all_logits=wants_prompt)
            if recompute:
                return  # its next token was chosen before the preemption
            if wants_prompt:
                sequence.prompt_logprobs = self._prompt_logprobs(sequence, logits)
            choice = choose_tokens(logits[-1:], [sequence.params], [sequence.generator])[0]
        except Exception as exc:  # a broken model must fail the request, not the worker
            log.exception("prefill failed for %s", sequence.request.request_id)
            self._retire(sequence, "error", str(exc))
            return
        self._first_token(sequence, choice)

    def _first_token(self, sequence: Sequence, choice: Choice) -> None:
        """Count a fresh prefill's prompt and take the token it chose."""
        self._prompt_total += sequence.prompt_len
        self._generated_total += 1
        reason = sequence.accept(choice, sequence.model.max_seq_len)
        if reason is not None:
            self._retire(sequence, reason)

    def _prompt_logprobs(
        self, sequence: Sequence, logits: torch.Tensor
    ) -> tuple[TokenLogprob | None, ...]:
        top_k = sequence.params.logprobs or 0
        scored = prompt_logprobs(logits, sequence.request.prompt_ids, top_k)
        return tuple(
            None if entry is None else sequence.logprob_entry(*entry) for entry in scored
        )

    def _step(self) -> None:
        with self._lock:
            self._scheduler.reserve_decode()
            self._sync_adapters()
        running = list(self._scheduler.running)
        if not running:
            return
        served = running[0].model
        try:
            logits = self._worker.decode(running)
            choices = choose_tokens(
                logits, [s.params for s in running], [s.generator for s in running]
            )
        except Exception as exc:
            log.exception("decode step failed")
            for sequence in running:
                self._retire(sequence, "error", str(exc))
            return
        self._decode_steps += 1
        self._generated_total += len(running)
        finished: list[tuple[Sequence, FinishReason]] = []
        for sequence, choice in zip(running, choices, strict=True):
            sequence.cache_len += 1
            reason = sequence.accept(choice, served.max_seq_len)
            if reason is not None:
                finished.append((sequence, reason))
        for sequence, reason in finished:
            self._retire(sequence, reason)

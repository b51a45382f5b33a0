"""The generation engine: a worker thread running continuous batching.

Requests wait in a bounded queue. At every decode step the worker retires
finished, cancelled and timed-out sequences, admits waiting requests while the
batch has room (`max_batch` sequences, `max_batch_tokens` cache positions),
prefills each newcomer, then advances every running sequence by one token in a
single batched forward pass. Tokens reach each consumer's asyncio queue as soon
as they are chosen, so streams interleave.

All model work happens on the worker thread, off the event loop, so the HTTP
layer stays responsive during long generations.
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
from server.engine.sampling import choose_tokens, prompt_logprobs
from server.engine.sequence import Sequence
from server.engine.served_model import CompileMode, ServedModel
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
        max_batch: int = 8,
        max_batch_tokens: int = 4096,
        max_queue: int = 64,
        num_threads: int | None = None,
        compile: CompileMode = "off",
    ) -> None:
        if max_batch < 1 or max_batch_tokens < 2 or max_queue < 0:
            raise ValueError("max_batch >= 1, max_batch_tokens >= 2 and max_queue >= 0 required")
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.num_threads = num_threads or available_cores()
        self.compile: CompileMode = compile
        self._active = self._serve(loaded)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._lock = threading.Lock()
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
        seconds = self._active.warm_up()
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
        return self._active.loaded

    def swap_model(self, loaded: LoadedModel) -> None:
        """Build and warm the new model, then make it the one new requests use.

        Requests already submitted keep the model they were submitted under;
        the worker drains that batch before admitting any request for the new
        one, because a batch runs one model.
        """
        served = self._serve(loaded)
        served.warm_up()
        self._active = served

    def _serve(self, loaded: LoadedModel) -> ServedModel:
        return ServedModel(
            loaded, max_batch=self.max_batch, max_seq_len=self.max_batch_tokens,
            compile=self.compile,
        )

    def stats(self) -> EngineStats:
        running = list(self._running)
        models = {id(s.model): s.model for s in running}
        models[id(self._active)] = self._active
        return EngineStats(
            running=len(running),
            waiting=len(self._waiting),
            kv_cache_bytes=sum(m.runner.kv_cache_bytes for m in models.values()),
            max_batch=self.max_batch,
            total_finished=self._finished_total,
            extra={
                "generated_tokens_total": float(self._generated_total),
                "prompt_tokens_total": float(self._prompt_total),
                "decode_steps_total": float(self._decode_steps),
                "warmup_seconds": self._active.warmup_s,
                "compile_seconds": self._active.compile_s,
                "decode_compiled": float(self._active.compiled),
                "decode_cuda_graphs": float(self._active.runner.cuda_graphs),
                "prepared_weight_bytes": float(self._active.runner.prepared_weight_bytes),
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

        served = self._active
        sequence = Sequence(request, served, sink, served.eos_ids)
        with self._lock:
            if not self._accepting:
                raise EngineShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloaded(retry_after_s=1.0)
            self._waiting.append(sequence)
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
            pending, self._waiting = list(self._waiting), deque()
        for sequence in pending:
            self._finished_total += 1
            sequence.finish("cancelled")

    # -------------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            if self._cancel_all:
                self._cancel_pending()
                for sequence in list(self._running):
                    self._retire(sequence, "cancelled")
                return
            self._expire_waiting()
            self._retire_interrupted()
            self._admit()
            if self._running:
                self._step()
                continue
            if self._stop and not self._waiting:
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
            for sequence in self._waiting:
                reason = self._interrupt_reason(sequence, now)
                if reason is None:
                    keep.append(sequence)
                else:
                    dropped.append((sequence, reason))
            self._waiting = keep
        for sequence, reason in dropped:
            self._finished_total += 1
            sequence.finish(reason)

    def _retire_interrupted(self) -> None:
        now = time.perf_counter()
        for sequence in list(self._running):
            reason = self._interrupt_reason(sequence, now)
            if reason is not None:
                self._retire(sequence, reason)

    def _retire(self, sequence: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Free a sequence's slot, then send its Finish.

        The last running sequence moves into the freed slot so that running
        sequences stay in slots 0..n-1.
        """
        slot = sequence.slot
        last = self._running[-1]
        if last is not sequence:
            sequence.model.runner.move_slot(last.slot, slot, last.cache_len)
            last.slot = slot
            self._running[slot] = last
        self._running.pop()
        self._finished_total += 1
        sequence.finish(reason, error)

    def _fits(self, sequence: Sequence) -> bool:
        if not self._running:
            return True
        if len(self._running) >= self.max_batch or sequence.model is not self._running[0].model:
            return False
        used = sum(min(s.budget_tokens, s.model.max_seq_len) for s in self._running)
        return used + min(sequence.budget_tokens, sequence.model.max_seq_len) <= (
            self.max_batch_tokens
        )

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or not self._fits(self._waiting[0]):
                    return
                sequence = self._waiting.popleft()
            self._prefill(sequence)

    def _prefill(self, sequence: Sequence) -> None:
        sequence.admitted = time.perf_counter()
        served = sequence.model
        prompt = sequence.request.prompt_ids
        if not prompt or len(prompt) >= served.max_seq_len:
            self._finished_total += 1
            sequence.finish(
                "error",
                f"prompt has {len(prompt)} tokens; 1..{served.max_seq_len - 1} are supported",
            )
            return
        sequence.slot = len(self._running)
        self._running.append(sequence)
        try:
            logits = served.runner.prefill(
                sequence.slot, prompt, all_logits=sequence.request.prompt_logprobs
            )
            if sequence.request.prompt_logprobs:
                sequence.prompt_logprobs = self._prompt_logprobs(sequence, logits)
            choice = choose_tokens(logits[-1:], [sequence.params], [sequence.generator])[0]
        except Exception as exc:  # a broken model must fail the request, not the worker
            log.exception("prefill failed for %s", sequence.request.request_id)
            self._retire(sequence, "error", str(exc))
            return
        sequence.cache_len = len(prompt)
        self._prompt_total += len(prompt)
        self._generated_total += 1
        reason = sequence.accept(choice, served.max_seq_len)
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
        running = self._running
        served = running[0].model
        device = served.runner.device
        tokens = torch.tensor([s.last_token for s in running], dtype=torch.long, device=device)
        positions = torch.tensor([s.cache_len for s in running], dtype=torch.long, device=device)
        try:
            logits = served.runner.decode(tokens, positions)
            choices = choose_tokens(
                logits, [s.params for s in running], [s.generator for s in running]
            )
        except Exception as exc:
            log.exception("decode step failed")
            for sequence in list(running):
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

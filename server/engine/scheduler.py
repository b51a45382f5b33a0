"""Which sequences run in the next step: admission, growth and preemption.

Pure policy over sequences and a `BlockManager` (no torch, no model), so it
can be tested on its own; the worker carries out what it decides.

* **Admission** is first come, first served: the head of the queue is admitted
  while the batch has a free seat (`max_num_seqs`), the step's token budget
  (`max_num_batched_tokens`: prompt tokens prefilled plus one per running
  sequence) has room for its prompt, and the pool has blocks for it. A
  request that does not fit waits; nothing behind it overtakes it. A batch
  runs one model, so a request submitted for another model version waits
  until the running ones finish.
* **Growth**: before a decode step every running sequence needs room for one
  more token. When the pool is out of blocks the newest running sequence is
  **preempted**: its blocks are freed and it goes back to the head of the
  queue, to be prefilled again (prompt and output so far) when blocks free
  up: recomputation, as vLLM does by default. The oldest sequences keep
  running, so the batch always makes progress.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from server.engine.block_manager import Allocation, BlockManager


class Schedulable(Protocol):
    """What the scheduler needs to know about a sequence."""

    block_ids: list[int]
    cache_len: int  # tokens whose KV is in the sequence's blocks
    allocation: Allocation | None  # set on admission, until the prefill is done

    @property
    def blocks(self) -> BlockManager: ...  # the pool of the model it runs on

    @property
    def group(self) -> Hashable: ...  # sequences batch together only within one group

    @property
    def prefix_namespace(self) -> Hashable: ...  # prompt blocks are shared only within one

    @property
    def reuse_prefix(self) -> bool: ...  # may start from cached prompt blocks

    def prefill_tokens(self) -> list[int]: ...  # what its KV must hold before decoding


S = TypeVar("S", bound=Schedulable)


class Scheduler(Generic[S]):
    """The waiting queue and the running batch."""

    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self.preemptions = 0

    def add(self, sequence: S) -> None:
        self.waiting.append(sequence)

    def admit(self) -> list[S]:
        """Take waiting sequences into the batch; their blocks are allocated and
        `allocation.cached_tokens` says how much of the prompt is already there."""
        admitted: list[S] = []
        budget = self.max_num_batched_tokens - len(self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[0]
            if self.running and sequence.group != self.running[0].group:
                break
            tokens = sequence.prefill_tokens()
            # The first prefill of a step always fits: a sequence is at most
            # max_model_len <= max_num_batched_tokens tokens.
            if admitted and len(tokens) > budget:
                break
            allocation = sequence.blocks.allocate(
                tokens, sequence.prefix_namespace, reuse=sequence.reuse_prefix
            )
            if allocation is None:
                break
            self.waiting.popleft()
            sequence.allocation = allocation
            sequence.block_ids = allocation.block_ids
            sequence.cache_len = 0
            self.running.append(sequence)
            admitted.append(sequence)
            budget -= len(tokens) - allocation.cached_tokens
        return admitted

    def reserve_decode(self) -> list[S]:
        """Give every running sequence room for its next token, preempting the
        newest when the pool is short. Returns the preempted sequences."""
        preempted: list[S] = []
        index = 0
        while index < len(self.running):
            sequence = self.running[index]
            if sequence.blocks.grow(sequence.block_ids, sequence.cache_len + 1):
                index += 1
                continue
            victim = self.running.pop()
            self._release(victim)
            preempted.append(victim)
        self.preemptions += len(preempted)
        # Back to the head of the queue, oldest first, ahead of new requests.
        self.waiting.extendleft(reversed(preempted))
        return preempted

    def retire(self, sequence: S) -> None:
        """A running sequence is done: its blocks go back to the pool."""
        self.running.remove(sequence)
        self._release(sequence)

    @staticmethod
    def _release(sequence: S) -> None:
        sequence.blocks.free(sequence.block_ids)
        sequence.allocation = None
        sequence.cache_len = 0

"""The scheduler and the block manager are pure policy: tested here on plain
objects, in a process that never imports torch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from server.engine.block_manager import Allocation, BlockManager
from server.engine.scheduler import Scheduler
from tests.helpers.server_process import REPO_ROOT


@dataclass
class Seq:
    prompt: list[int]
    blocks: BlockManager
    group: int = 0
    reuse_prefix: bool = True
    output: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    cache_len: int = 0
    allocation: Allocation | None = None

    @property
    def prefix_namespace(self) -> int:
        return self.group

    def prefill_tokens(self) -> list[int]:
        return [*self.prompt, *self.output[:-1]]

    def prefilled(self) -> None:
        """What the worker does after a prefill: the KV is written, blocks shared."""
        assert self.allocation is not None
        self.blocks.publish(self.allocation)
        self.cache_len = len(self.prefill_tokens())

    def chose(self, token: int) -> None:
        """A token was picked (by the prefill or a decode step); it enters the
        cache in the next decode step."""
        if self.output:
            self.cache_len += 1
        self.output.append(token)


def test_the_scheduler_and_block_manager_import_without_torch() -> None:
    code = (
        "import sys; import server.engine.scheduler, server.engine.block_manager; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_blocks_are_handed_out_as_sequences_grow_and_returned() -> None:
    blocks = BlockManager(4, 4, prefix_caching=False)
    table: list[int] = []
    assert blocks.grow(table, 5) and table == [0, 1]
    assert blocks.grow(table, 8) and table == [0, 1]
    assert blocks.grow(table, 9) and table == [0, 1, 2]
    assert not blocks.grow(table, 17) and table == [0, 1, 2]
    assert blocks.stats().used == 3
    blocks.free(table)
    assert table == [] and blocks.stats().used == 0 and blocks.num_free == 4
    # Freed blocks are handed out again first (their pages are already resident).
    again: list[int] = []
    assert blocks.grow(again, 1) and again == [0]


def test_full_prompt_blocks_are_reused_by_content_and_evicted_when_unused() -> None:
    blocks = BlockManager(12, 2)
    first = blocks.allocate([1, 2, 3, 4, 5], "m")
    assert first is not None and first.cached_tokens == 0 and len(first.block_ids) == 3
    blocks.publish(first)
    # Same first four tokens: two blocks reused; the last token is always computed.
    second = blocks.allocate([1, 2, 3, 4, 9], "m")
    assert second is not None and second.cached_tokens == 4
    assert second.block_ids[:2] == first.block_ids[:2]
    stats = blocks.stats()
    assert (stats.prefix_queries, stats.prefix_hits) == (10, 4)
    # A prefix equal only from the second block on is no hit: keys chain the blocks before.
    third = blocks.allocate([7, 7, 3, 4, 5], "m")
    assert third is not None and third.cached_tokens == 0
    # Another namespace (model version) never sees these blocks.
    other = blocks.allocate([1, 2, 3, 4, 5], "other")
    assert other is not None and other.cached_tokens == 0
    for allocation in (first, second, third, other):
        blocks.free(allocation.block_ids)
    stats = blocks.stats()
    assert stats.used == 0 and stats.cached == 2  # the shared prefix's two blocks stay cached
    # Needing every block evicts the cached ones (least recently used first).
    everything = blocks.allocate(list(range(100, 124)), "m")
    assert everything is not None and len(everything.block_ids) == 12
    assert blocks.stats().cached == 0
    blocks.free(everything.block_ids)
    again = blocks.allocate([1, 2, 3, 4, 5], "m")
    assert again is not None and again.cached_tokens == 0


def test_hits_count_in_whole_reuse_units() -> None:
    blocks = BlockManager(8, 2, reuse_unit=2)
    first = blocks.allocate(list(range(9)), "m")
    assert first is not None
    blocks.publish(first)
    # Three full blocks match, but reuse comes in runs of two: 4 tokens.
    again = blocks.allocate([*range(6), 50, 51, 52], "m")
    assert again is not None and again.cached_tokens == 4


def test_admission_waits_for_blocks_and_keeps_order() -> None:
    blocks = BlockManager(4, 4, prefix_caching=False)
    scheduler: Scheduler[Seq] = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Seq(list(range(10 * i, 10 * i + 6)), blocks) for i in range(3)]  # 2 blocks each
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.admit() == seqs[:2]
    assert list(scheduler.waiting) == [seqs[2]]
    scheduler.retire(seqs[0])
    assert scheduler.admit() == [seqs[2]]


def test_limits_on_seats_tokens_per_step_and_model_version() -> None:
    blocks = BlockManager(64, 4, prefix_caching=False)
    seats: Scheduler[Seq] = Scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(3):
        seats.add(Seq([i] * 3, blocks))
    assert len(seats.admit()) == 2
    step: Scheduler[Seq] = Scheduler(max_num_seqs=8, max_num_batched_tokens=20)
    for i in range(3):
        step.add(Seq([i] * 8, blocks))
    assert len(step.admit()) == 2  # 8 + 8 prompt tokens; a third would make 24
    versions: Scheduler[Seq] = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    old, new = Seq([1, 2], blocks, group=0), Seq([3, 4], blocks, group=1)
    versions.add(old)
    versions.add(new)
    assert versions.admit() == [old]  # a batch runs one model version
    versions.retire(old)
    assert versions.admit() == [new]


def test_a_sequence_that_cannot_grow_preempts_the_newest_which_recomputes() -> None:
    blocks = BlockManager(3, 4, prefix_caching=False)
    scheduler: Scheduler[Seq] = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    old, young = Seq([1, 2, 3], blocks), Seq([4, 5, 6], blocks)
    scheduler.add(old)
    scheduler.add(young)
    assert scheduler.admit() == [old, young]
    for seq in (old, young):
        seq.prefilled()
        seq.chose(7)  # 3 tokens in cache, a 4th to hold next step
    assert scheduler.reserve_decode() == []  # each grows into its one block
    for seq in (old, young):
        seq.chose(8)  # 4 in cache: the 5th needs a second block each, one is left
    assert scheduler.reserve_decode() == [young]
    assert scheduler.running == [old] and list(scheduler.waiting) == [young]
    assert young.block_ids == [] and young.cache_len == 0 and scheduler.preemptions == 1
    # Recomputed on readmission: prompt and output but the newest token (fed next).
    assert young.prefill_tokens() == [4, 5, 6, 7]
    scheduler.retire(old)
    assert scheduler.admit() == [young]


def test_a_lone_sequence_that_cannot_grow_preempts_itself_without_looping() -> None:
    blocks = BlockManager(1, 2, prefix_caching=False)
    scheduler: Scheduler[Seq] = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    seq = Seq([1], blocks)
    scheduler.add(seq)
    scheduler.admit()
    seq.prefilled()
    seq.chose(2)
    seq.chose(3)  # 2 tokens in cache: the next needs a second block the pool lacks
    assert scheduler.reserve_decode() == [seq]
    assert scheduler.running == []

"""Which KV cache blocks each sequence holds, and which prompt blocks can be reused.

Pure bookkeeping over block ids (no torch): the worker owns the tensors the ids
index. A block holds `block_size` consecutive tokens of one sequence; a
sequence's block table lists its blocks in order, so token `t` lives in slot
`t % block_size` of block `table[t // block_size]`.

**Prefix caching.** A full block of prompt tokens is keyed by its tokens and
the key of the block before it (a hash chain, seeded with a namespace such as
the model version), so equal keys mean equal prefixes, and the block's KV can
be shared by every sequence whose prompt starts the same way. Blocks are
reference counted; one no sequence uses keeps its content and sits in an LRU
list, reused by a later hit or evicted (oldest first) when a fresh block is
needed. The dictionary compares the whole key (parent hash, tokens), so only a
64-bit collision of two different parents with equal tokens could alias.

Free blocks are handed out lowest id first and returned to the front of the
free list, so a lightly loaded server keeps touching the same few pages of the
pool: memory the operating system never saw written stays unallocated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

BlockKey = tuple[int, tuple[int, ...]]


@dataclass
class Allocation:
    """Blocks handed to one sequence for its prompt."""

    block_ids: list[int]
    cached_tokens: int  # leading tokens whose KV is already in the blocks (prefix hits)
    keys: list[BlockKey] = field(default_factory=list)  # keys of the prompt's full blocks


@dataclass(frozen=True)
class BlockStats:
    total: int
    used: int  # held by at least one sequence
    cached: int  # held by none, content kept for prefix reuse
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, tokens found there


class BlockManager:
    """A fixed pool of `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self, num_blocks: int, block_size: int, *, prefix_caching: bool = True,
        reuse_unit: int = 1,
    ) -> None:
        """`reuse_unit`: prefix hits count in whole runs of that many blocks (the
        runner's prefill chunk), so a prefill always starts on a chunk boundary."""
        if num_blocks < 1 or block_size < 1 or reuse_unit < 1:
            raise ValueError("num_blocks, block_size and reuse_unit must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.reuse_unit = reuse_unit
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id
        self._refs = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unused cached blocks, LRU first
        self._queries = 0
        self._hits = 0

    # -------------------------------------------------------------- accounting
    @property
    def num_free(self) -> int:
        """Blocks a sequence could be given now (free, or cached and unused)."""
        return len(self._free) + len(self._evictable)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def stats(self) -> BlockStats:
        cached = len(self._evictable)
        return BlockStats(
            total=self.num_blocks, used=self.num_blocks - len(self._free) - cached,
            cached=cached, prefix_queries=self._queries, prefix_hits=self._hits,
        )

    # -------------------------------------------------------------- allocation
    def prompt_keys(self, tokens: Sequence[int], namespace: Hashable) -> list[BlockKey]:
        """Keys of the full blocks of `tokens`, each chained to the ones before."""
        keys: list[BlockKey] = []
        parent = hash(namespace)
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            key = (parent, tuple(tokens[start : start + size]))
            keys.append(key)
            parent = hash(key)
        return keys

    def allocate(
        self, tokens: Sequence[int], namespace: Hashable, *, reuse: bool = True
    ) -> Allocation | None:
        """Blocks for a prompt of `tokens`, reusing cached full blocks of its prefix
        unless `reuse` is off (the caller needs every prompt position computed).

        At least the last token is left to compute (its logits pick the next
        token). Returns None, taking nothing, when the pool cannot hold it now.
        """
        keys = self.prompt_keys(tokens, namespace) if self.prefix_caching else []
        reusable = (len(tokens) - 1) // self.block_size if reuse else 0
        hits: list[int] = []
        for key in keys[:reusable]:
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        del hits[len(hits) - len(hits) % self.reuse_unit :]
        needed = self.blocks_for(len(tokens)) - len(hits)
        revived = sum(1 for b in hits if self._refs[b] == 0)
        if needed > self.num_free - revived:
            return None
        for block in hits:
            self._hold(block)
        fresh = [self._take() for _ in range(needed)]
        if self.prefix_caching and reuse:
            self._queries += len(tokens)
            self._hits += len(hits) * self.block_size
        return Allocation([*hits, *fresh], len(hits) * self.block_size, keys)

    def publish(self, allocation: Allocation) -> None:
        """Offer the allocation's full prompt blocks for reuse, once their KV is written."""
        for block, key in zip(allocation.block_ids, allocation.keys, strict=False):
            if key in self._block_of or block in self._key_of:
                continue
            self._key_of[block] = key
            self._block_of[key] = block

    def grow(self, block_ids: list[int], tokens: int) -> bool:
        """Make `block_ids` hold `tokens` tokens, adding blocks; False if the pool is short."""
        needed = self.blocks_for(tokens) - len(block_ids)
        if needed > self.num_free:
            return False
        block_ids.extend(self._take() for _ in range(needed))
        return True

    def free(self, block_ids: list[int]) -> None:
        """Give a finished or preempted sequence's blocks back.

        Tail blocks go first, so under pressure a shared prefix's head outlives
        its tails.
        """
        for block in reversed(block_ids):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        block_ids.clear()

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

"""The paged KV cache: one pool of fixed-size blocks shared by the running sequences.

Per layer, keys and values are `[num_blocks * block_size, kv_heads, head_dim]`
tensors (one row of head_dim per token and KV head), so a token's slot is
`block * block_size + offset` and a sequence's keys are gathered by its slot
list. All layers live in one allocation: on CPU it is large enough to be
mapped fresh from the operating system, whose pages only become resident when
a block is first written, so an idle server does not pay for its pool.

With `kv_cache_dtype` int8 each layer's keys and values are `Int8Rows`:
int8 codes with a float16 scale per token and head (`quantizers/kv_int8.py`),
quantised as they are written and dequantised as they are read, behind the
three tensor operations the runners use on the pool (`index_copy_`,
`index_select`, slicing), so the runners' attention code is the same for both.
A block then takes about half the bytes, and a budget holds about twice the
blocks.

A `KVPool` pairs the tensors with the `BlockManager` that hands their blocks
out. Models whose cache shape (layers, KV heads, head size, dtype, device)
match share one pool: a swap to another variant of the same model reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantizers.kv_int8 import SCALE_DTYPE, dequantize_rows, quantize_rows, row_bytes
from server.engine.block_manager import BlockManager
from server.engine.device import device_kv_cache_budget

CPU_DEFAULT_KV_CACHE_BYTES = 512 << 20
# Prefill runs in chunks of about this many tokens (a whole number of blocks):
# long enough for the matmuls to run near full speed, short enough that a
# cached prefix is reused to within one chunk.
PREFILL_CHUNK_TOKENS = 128


@dataclass(frozen=True)
class KVSpec:
    """The shape of one token's KV across the model: what decides pool sharing."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype  # what attention computes in (the model's)
    device: torch.device
    cache_dtype: str = "auto"  # how the pool stores it: "auto" (dtype) or "int8"

    def block_bytes(self, block_size: int) -> int:
        row = row_bytes(self.head_dim, self.cache_dtype, self.dtype)
        return 2 * self.layers * block_size * self.kv_heads * row


def pool_bytes(
    spec: KVSpec, kv_cache_bytes: int | None, gpu_memory_utilization: float
) -> int:
    """The pool's size: the operator's budget, else on CUDA what keeps the
    process within `gpu_memory_utilization` of the device (the model is loaded
    by now), else a fixed CPU default."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    budget = device_kv_cache_budget(spec.device, gpu_memory_utilization)
    return CPU_DEFAULT_KV_CACHE_BYTES if budget is None else budget


class Int8Rows:
    """One layer's keys (or values) as int8 codes `[slots, kv_heads, head_dim]`
    and float16 scales `[slots, kv_heads]`, read and written in `dtype`."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        self.codes = codes
        self.scales = scales
        self.dtype = dtype

    def index_copy_(self, dim: int, index: torch.Tensor, rows: torch.Tensor) -> Int8Rows:
        codes, scales = quantize_rows(rows)
        self.codes.index_copy_(dim, index, codes)
        self.scales.index_copy_(dim, index, scales)
        return self

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(
            self.codes.index_select(dim, index), self.scales.index_select(dim, index), self.dtype
        )

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return dequantize_rows(self.codes[rows], self.scales[rows], self.dtype)


# A layer's keys or values in the pool: a tensor, or int8 rows that act like one.
KVRows = torch.Tensor | Int8Rows


class KVCache:
    """Key and value slots for `num_blocks` blocks of every layer."""

    def __init__(self, spec: KVSpec, num_blocks: int, block_size: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (2, spec.layers, num_blocks * block_size, spec.kv_heads, spec.head_dim)
        # Uninitialised on purpose: attention only ever reads slots already written.
        if spec.cache_dtype == "int8":
            codes = torch.empty(shape, dtype=torch.int8, device=spec.device)
            scales = torch.empty(shape[:-1], dtype=SCALE_DTYPE, device=spec.device)
            self.k: list[KVRows] = [
                Int8Rows(c, s, spec.dtype) for c, s in zip(codes[0], scales[0], strict=True)
            ]
            self.v: list[KVRows] = [
                Int8Rows(c, s, spec.dtype) for c, s in zip(codes[1], scales[1], strict=True)
            ]
            parts = (codes, scales)
            self.storage: torch.Tensor | None = None
        else:
            storage = torch.empty(shape, dtype=spec.dtype, device=spec.device)
            self.k = list(storage[0].unbind(0))
            self.v = list(storage[1].unbind(0))
            parts = (storage,)
            # The whole pool as one tensor `[2, layers, slots, kv_heads, head_dim]`,
            # for the native decode step.
            self.storage = storage
        self.nbytes = sum(p.numel() * p.element_size() for p in parts)

    def slot_rows(self, block_ids: list[int], length: int) -> torch.Tensor:
        """Slots of a sequence's first `length` tokens, in order."""
        blocks = torch.tensor(block_ids, dtype=torch.long, device=self.spec.device)
        offsets = torch.arange(self.block_size, device=self.spec.device)
        return (blocks[:, None] * self.block_size + offsets).reshape(-1)[:length]


@dataclass
class KVPool:
    cache: KVCache
    blocks: BlockManager

    @property
    def chunk_tokens(self) -> int:
        """The prefill chunk: prefix reuse and prefill chunks share their boundaries."""
        return self.blocks.reuse_unit * self.blocks.block_size

    @classmethod
    def create(
        cls, spec: KVSpec, *, budget_bytes: int, block_size: int, prefix_caching: bool = True
    ) -> KVPool:
        num_blocks = budget_bytes // spec.block_bytes(block_size)
        if num_blocks < 1:
            raise ValueError(
                f"a KV cache of {budget_bytes} bytes holds no block of {block_size} tokens "
                f"({spec.block_bytes(block_size)} bytes)"
            )
        reuse_unit = max(1, PREFILL_CHUNK_TOKENS // block_size)
        return cls(
            KVCache(spec, num_blocks, block_size),
            BlockManager(
                num_blocks, block_size, prefix_caching=prefix_caching, reuse_unit=reuse_unit
            ),
        )

    @property
    def block_bytes(self) -> int:
        return self.cache.spec.block_bytes(self.cache.block_size)

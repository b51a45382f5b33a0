"""The general runner: any causal LM transformers loads, over the paged KV cache.

The lean runner re-implements the Llama layer for speed; this one calls the
model's own `forward`, so every architecture detail (scaled or tied
embeddings, logit soft-capping, q/k norms, biases, Conv1D projections,
parallel attention and MLP, rotary variants, learned positions) is right
because it is transformers' code that computes it. What it takes over is the
cache and the masks:

* `PagedStep`, a transformers `Cache`, is handed to the forward call: each
  attention layer's `update()` writes the step's keys and values into the
  sequences' pool slots and returns every sequence's keys and values gathered
  back from the pool, padded to the longest;
* the attention masks are built here, explicit 4-D additive masks (causal,
  padding of shorter sequences, sliding window per layer), and passed in
  already prepared, the way `generate` passes them, so the model builds none;
* position ids are each sequence's own, so sequences of different lengths
  decode in one batch.

One preparation, with the values untouched: float32 CPU linear weights are
stored column-major (`weight.t().contiguous().t()`, the same `[out, in]`
tensor with transposed strides), so `F.linear` hands MKL a plain `x @ W`
instead of `x @ W^T`. At one row that is the same speed; at 8 rows (a
batched decode step) it was 1.7-2x faster per matmul here, Gemma 3's
262,144-row head included (115 vs 190 ms). Tied weights stay tied: the
head's Parameter is the embedding's, and row lookups read any strides.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Cache

from server.engine.kv_cache import KVCache, KVSpec

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class GeneralRunnerError(ValueError):
    """The model's attention cannot run over the paged cache (a clear start-up refusal)."""


class PagedStep(Cache):
    """One forward call's view of the pool.

    `write` holds the slots of the call's new tokens in the order the model
    produces them (batch-major, then time); `read` the `[B, L]` slots each
    sequence attends over, or None when the new tokens are all there is (a
    prefill from the start), so keys go straight to attention.
    """

    def __init__(
        self, cache: KVCache, write: torch.Tensor, read: torch.Tensor | None, length: int
    ) -> None:
        super().__init__(layers=[])
        self.pool = cache
        self.write = write
        self.read = read
        self.length = length

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_pool, v_pool = self.pool.k[layer_idx], self.pool.v[layer_idx]
        batch, kv_heads, _, head_dim = key_states.shape
        rows = key_states.transpose(1, 2).reshape(-1, kv_heads, head_dim)
        k_pool.index_copy_(0, self.write, rows.to(k_pool.dtype))
        rows = value_states.transpose(1, 2).reshape(-1, kv_heads, head_dim)
        v_pool.index_copy_(0, self.write, rows.to(v_pool.dtype))
        if self.read is None:
            return key_states, value_states
        span = self.read.shape[1]
        flat = self.read.reshape(-1)
        keys = k_pool.index_select(0, flat).view(batch, span, kv_heads, head_dim)
        values = v_pool.index_select(0, flat).view(batch, span, kv_heads, head_dim)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class _Probe(Cache):
    """Records the shape of every layer's keys on one token, writing nothing."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.shapes: dict[int, tuple[int, int, torch.dtype]] = {}

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape != value_states.shape:
            raise GeneralRunnerError(
                f"layer {layer_idx} has keys {tuple(key_states.shape)} and values "
                f"{tuple(value_states.shape)} of different shapes"
            )
        self.shapes[layer_idx] = (key_states.shape[1], key_states.shape[3], key_states.dtype)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def layer_windows(config: Any, layers: int) -> list[int | None]:
    """Each layer's sliding window (None: global attention), from the config's
    `layer_types` where it has them, else its `sliding_window` for all."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return [int(window) if window else None] * layers
    unknown = sorted({t for t in types} - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise GeneralRunnerError(f"attention layer types {unknown} are not supported")
    return [int(window) if t == SLIDING_ATTENTION and window else None for t in types]


# What one call passes as `attention_mask`: one mask, or one per layer type.
Masks = torch.Tensor | dict[str, torch.Tensor]


def column_major_linears(model: nn.Module) -> int:
    """Store every float32 CPU `nn.Linear` weight column-major in place; returns
    how many were re-laid. The old storage is freed as each is replaced."""
    relaid = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and weight.is_contiguous()
        ):
            weight.data = weight.data.t().contiguous().t()
            relaid += 1
    return relaid


class GeneralRunner:
    """Prefill and batched decode of any transformers causal LM over a KV cache it is handed."""

    pack_rows = 0  # prefills one sequence at a time

    def __init__(self, model: nn.Module) -> None:
        column_major_linears(model)
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.spec_layers, self.kv_heads, self.head_dim, self.dtype = self._probe()
        self.windows = layer_windows(self.config, self.spec_layers)
        self.distinct_windows = sorted({w for w in self.windows if w is not None})
        if len(self.distinct_windows) > 1:
            raise GeneralRunnerError(
                f"sliding windows of different sizes {self.distinct_windows} are not supported"
            )
        self.window = self.distinct_windows[0] if self.distinct_windows else None
        self.mixed = self.window is not None and None in self.windows
        self.mask_min = torch.finfo(self.dtype).min

    def _probe(self) -> tuple[int, int, int, torch.dtype]:
        """Layers, KV heads, head size and dtype of the keys, from one token's forward."""
        probe = _Probe()
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, cache=probe, use_cache=True, logits_to_keep=1)
        if not probe.shapes:
            raise GeneralRunnerError("the model caches no keys and values (not attention-based)")
        distinct = set(probe.shapes.values())
        if len(distinct) > 1 or sorted(probe.shapes) != list(range(len(probe.shapes))):
            raise GeneralRunnerError(
                "layers with keys of different shapes (or shared between layers) are not supported"
            )
        kv_heads, head_dim, dtype = distinct.pop()
        return len(probe.shapes), int(kv_heads), int(head_dim), dtype

    @property
    def kv_spec(self) -> KVSpec:
        return KVSpec(
            layers=self.spec_layers,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @property
    def prepared_weight_bytes(self) -> int:
        """Nothing is prepared: the model's own modules run as they are."""
        return 0

    def _masks(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor, lengths: torch.Tensor
    ) -> Masks:
        """Additive masks `[B, 1, Q, K]`: key k is seen by query q of sequence b
        when k <= q, k < lengths[b] and, on sliding layers, k > q - window."""
        q = query_positions[:, None, :, None]
        k = key_positions[None, None, None, :]
        seen = (k <= q) & (k < lengths[:, None, None, None])
        full = self._additive(seen)
        if self.window is None:
            return full
        sliding = self._additive(seen & (k > q - self.window))
        if not self.mixed:
            return sliding
        return {FULL_ATTENTION: full, SLIDING_ATTENTION: sliding}

    def _additive(self, seen: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(seen, zero, torch.tensor(self.mask_min, dtype=self.dtype))

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        step: PagedStep,
        masks: Masks,
        keep: int,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=masks,
            cache=step,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits.float()

    @torch.inference_mode()
    def prefill(
        self,
        cache: KVCache,
        block_ids: list[int],
        token_ids: list[int],
        *,
        start: int = 0,
        chunk: int | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Write the KV of `token_ids[start:]` into the sequence's blocks (the
        first `start` already there: a cached prefix); float32 logits
        `[T - start, vocab]` when `all_logits`, else `[1, vocab]`.

        Runs in chunks of `chunk` tokens (default: all at once) aligned to
        multiples of `chunk` from the first token, `start` being one, as the
        lean runner does: a prefill after a cached prefix then computes the
        numbers a prefill from scratch computes.
        """
        total = len(token_ids)
        chunk = chunk or total
        if start % chunk or not 0 <= start < total:
            raise ValueError(f"prefill start {start} is not a multiple of {chunk} below {total}")
        rows = cache.slot_rows(block_ids, total)
        logits = [
            self._prefill_span(cache, rows, token_ids, begin, min(begin + chunk, total), all_logits)
            for begin in range(start, total, chunk)
        ]
        return torch.cat(logits) if all_logits else logits[-1]

    def _prefill_span(
        self,
        cache: KVCache,
        rows: torch.Tensor,
        token_ids: list[int],
        begin: int,
        end: int,
        all_logits: bool,
    ) -> torch.Tensor:
        """Tokens `begin:end`, attending over keys `0:end`."""
        ids = torch.tensor([token_ids[begin:end]], dtype=torch.long, device=self.device)
        positions = torch.arange(begin, end, device=self.device)
        step = PagedStep(cache, rows[begin:end], rows[None, :end] if begin else None, end)
        lengths = torch.tensor([end], device=self.device)
        masks = self._masks(positions[None], torch.arange(end, device=self.device), lengths)
        logits = self._forward(ids, positions[None], step, masks, 0 if all_logits else 1)
        return logits[0]

    @torch.inference_mode()
    def decode(
        self,
        cache: KVCache,
        token_ids: torch.Tensor,
        positions: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode step: `token_ids[i]` goes to position `positions[i]` of the
        sequence whose blocks are `block_tables[i]`; float32 logits `[B, vocab]`."""
        span = max(positions) + 1
        reads = []
        for table, position in zip(block_tables, positions, strict=True):
            own = cache.slot_rows(table, position + 1)
            # Padding reads the sequence's first slot again; the mask hides it.
            reads.append(torch.cat([own, own[:1].expand(span - own.shape[0])]))
        read = torch.stack(reads)
        at = torch.tensor(positions, dtype=torch.long, device=self.device)
        write = read[torch.arange(read.shape[0], device=self.device), at]
        step = PagedStep(cache, write, read, span)
        masks = self._masks(at[:, None], torch.arange(span, device=self.device), at + 1)
        logits = self._forward(token_ids[:, None], at[:, None], step, masks, 1)
        return logits[:, -1]

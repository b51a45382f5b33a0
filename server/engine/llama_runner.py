"""A lean forward pass for Llama-family models over a slot-based static KV cache.

transformers' `generate` pays for generality on every token: cache objects,
mask construction, output dataclasses and hooks across 30 small layers. On a
2-core CPU that per-token overhead, not arithmetic, bounds decode speed. This
runner calls the model's own modules (so quantised drop-in replacements of
`nn.Linear` run their low-bit kernels) but does the bookkeeping itself:

* the KV cache is allocated once, `[max_batch, kv_heads, max_seq_len, head_dim]`
  per layer, and a running sequence owns one slot;
* running sequences always occupy slots `0..n-1`, so a decode step attends over a
  *view* of the cache and never gathers it;
* rotary tables and the attention mask are computed once per step, not per layer;
* grouped-query attention at decode folds the query heads that share a KV head
  into the query-length axis, so keys are never repeated;
* q/k/v and gate/up run as one matmul each and bf16 weights are prepacked for
  oneDNN (`projections.py`), exactly where that gives the same numbers; the
  prepared modules replace the originals inside the model, so the weights are
  held once (but for a packed head tied to the embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.projections import Projection

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


class UnsupportedModelError(ValueError):
    """The model's architecture does not have the layer layout this runner expects."""


def _rms_norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as torch's fused kernel: 2-4 ops instead of the module's ~8.

    Same arithmetic as the Llama RMSNorm module (normalise in float32, cast
    back, scale by the weight), so outputs match it exactly.
    """
    weight = norm.weight
    eps = float(norm.variance_epsilon)
    shape = (weight.shape[0],)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), shape, eps=eps).to(x.dtype) * weight

    return apply


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def buckets(limit: int, first: int) -> tuple[int, ...]:
    """Powers of two from `first` below `limit`, then `limit`: the padded sizes of
    a dimension that CUDA graphs (one graph per shape) are captured for."""
    sizes = []
    size = first
    while size < limit:
        sizes.append(size)
        size *= 2
    return (*sizes, limit)


@cache
def graph_thread() -> ThreadPoolExecutor:
    """The one thread every CUDA-graph decode step runs on, captures included.

    torch keeps its CUDA graph trees in thread-local state: graphs captured
    while the loader or a quantisation job warms a model up would not be found
    from the engine's worker thread, which would capture them again on its
    first requests. One thread for all of them keeps capture at warm-up."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantserve-cuda-graphs")


class LlamaRunner:
    """Runs prefill and batched decode for one model with its own KV cache."""

    def __init__(
        self, model: nn.Module, *, max_batch: int, max_seq_len: int, prepare: bool = True,
        prepack: bool = True,
    ) -> None:
        """`prepare=False` runs the model's modules as they are: the reference
        the prepared (fused, prepacked) path is tested against. `prepack=False`
        fuses without oneDNN packing, for a runner that will be compiled."""
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {getattr(config, 'model_type', None)!r} is not supported; "
                f"supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        body = model.model
        self.layers = list(body.layers)
        self.embed = body.embed_tokens
        self.final_norm = _rms_norm(body.norm)
        self.input_norms = [_rms_norm(layer.input_layernorm) for layer in self.layers]
        self.post_norms = [_rms_norm(layer.post_attention_layernorm) for layer in self.layers]
        # What the embedding hands to the layers: its weight's dtype for a float
        # embedding, the compute dtype for a quantised one (int8 codes).
        self.device = next(body.embed_tokens.buffers(), body.embed_tokens.weight).device
        with torch.inference_mode():
            self.dtype = self.embed(torch.zeros(1, dtype=torch.long, device=self.device)).dtype

        def projection(owner: nn.Module, *names: str, install: bool = True) -> Projection:
            sites = [(owner, name) for name in names]
            return Projection(
                sites, prepare=prepare, dtype=self.dtype, prepack=prepack, install=install
            )

        self.qkv = [
            projection(layer.self_attn, "q_proj", "k_proj", "v_proj") for layer in self.layers
        ]
        self.o_proj = [projection(layer.self_attn, "o_proj") for layer in self.layers]
        self.gate_up = [projection(layer.mlp, "gate_proj", "up_proj") for layer in self.layers]
        self.down = [projection(layer.mlp, "down_proj") for layer in self.layers]
        self.act = [layer.mlp.act_fn for layer in self.layers]
        # A head tied to the embedding stays in the model: the embedding looks
        # rows up in that same weight, so its prepared (packed) form is extra.
        head_weight = getattr(model.lm_head, "weight", None)
        tied = head_weight is not None and head_weight is getattr(self.embed, "weight", None)
        self.lm_head = projection(model, "lm_head", install=not tied)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        )
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5))
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        shape = (max_batch, self.num_kv_heads, max_seq_len, self.head_dim)
        self.k_cache = [self._empty(shape) for _ in self.layers]
        self.v_cache = [self._empty(shape) for _ in self.layers]
        positions = torch.arange(max_seq_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            cos, sin = body.rotary_emb(probe, positions)
        self.cos = cos[0].to(self.dtype)
        self.sin = sin[0].to(self.dtype)
        self.batch_index = torch.arange(max_batch, device=self.device)
        self.kv_head_index = torch.arange(self.num_kv_heads, device=self.device)[None]
        self.key_positions = torch.arange(max_seq_len, device=self.device)
        self._step = self._decode_step
        # (batch sizes, attention spans) decode steps are padded to, when set
        self.shape_buckets: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.cuda_graphs = False

    @property
    def prepared_weight_bytes(self) -> int:
        """Bytes preparation adds to the model's own: prepared modules replace the
        originals in the model, so this is only a packed head tied to the
        embedding, plus whatever else still holds replaced modules' tensors."""
        projections = [*self.qkv, *self.o_proj, *self.gate_up, *self.down, self.lm_head]
        return sum(p.weight_bytes for p in projections)

    def _empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def kv_cache_bytes(self) -> int:
        per_layer = self.k_cache[0].numel() * self.k_cache[0].element_size()
        return 2 * per_layer * len(self.layers)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache from slot `src` to `dst` (keeps slots dense)."""
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def _mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[index](h)
        return self.down[index](self.act[index](gate) * up)[0]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))[0].float()

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run a prompt through the model into cache slot `slot`.

        Returns float32 logits `[T, vocab]` when `all_logits` (prompt logprobs)
        else `[1, vocab]` for the last position only, sparing the vocab
        projection of every other prompt token.
        """
        length = len(token_ids)
        ids = torch.tensor(token_ids, device=self.device)
        x = self.embed(ids)
        cos = self.cos[:length][None, None]
        sin = self.sin[:length][None, None]
        for index in range(len(self.layers)):
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            q, k, v = self.qkv[index](self.input_norms[index](x))
            q = q.view(1, length, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_cache[slot, :, :length] = k[0]
            v_cache[slot, :, :length] = v[0]
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.group > 1
            )
            x = x + self.o_proj[index](out.transpose(1, 2).reshape(length, -1))[0]
            x = x + self._mlp(index, self.post_norms[index](x))
        hidden = x if all_logits else x[-1:]
        return self._logits(hidden)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for the sequences in slots `0..B-1`.

        `token_ids` and `positions` are `[B]` long tensors: each sequence's
        newest token and the cache position it goes to. Returns float32 logits
        `[B, vocab]`.
        """
        batch = token_ids.shape[0]
        span = int(positions.max()) + 1
        if self.shape_buckets is not None:
            token_ids, positions, span = self._padded(token_ids, positions, span)
        mask = (self.key_positions[:span][None] <= positions[:, None])[:, None, None]
        if not self.cuda_graphs:
            return self._step(token_ids, positions, mask)[:batch]
        return graph_thread().submit(self._replay, token_ids, positions, mask, batch).result()

    @torch.inference_mode()
    def _replay(
        self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """One CUDA-graph step (on `graph_thread`). A new replay may overwrite the
        previous step's outputs (already consumed); the logits are copied out."""
        torch.compiler.cudagraph_mark_step_begin()
        return self._step(token_ids, positions, mask)[:batch].clone()

    def _padded(
        self, token_ids: torch.Tensor, positions: torch.Tensor, span: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Batch and span rounded up to their buckets. Padding rows decode token 0
        at position 0 of the free slots after the running ones (a free slot's
        cache is rewritten by the prefill that takes it); padded key positions
        are masked."""
        batches, spans = self.shape_buckets or ((), ())
        rows = next(b for b in batches if b >= token_ids.shape[0])
        extra = rows - token_ids.shape[0]
        if extra:
            token_ids = F.pad(token_ids, (0, extra))
            positions = F.pad(positions, (0, extra))
        return token_ids, positions, next(s for s in spans if s >= span)

    def compile_decode(self, cuda_graphs: bool = False) -> None:
        """Run decode steps through `torch.compile` (inductor) from now on.

        Batch size and attention span are dynamic dimensions, so one graph (and
        one more for batch 1, which is specialised) serves every step; the
        compilation itself happens on the first calls, which is why the caller
        runs them at warm-up. `eager_decode` undoes it.

        `cuda_graphs` (CUDA only): inductor's "reduce-overhead" mode replays
        each step as one CUDA graph, removing the ~200 kernel launches per step
        that bound decode of a small model. A graph has fixed shapes, so steps
        are padded to `shape_buckets` and the caller must run every bucket at
        warm-up: that captures the graphs then, never on a request. The KV
        caches and the runner's tables are marked as static addresses: the graphs
        write the caches in place, and neither is copied in on every replay (the
        modules' weights are static already).
        """
        if not cuda_graphs:
            self._step = torch.compile(self._decode_step, dynamic=True)
            return
        tables = (self.cos, self.sin, self.batch_index, self.kv_head_index, self.key_positions)
        for tensor in (*self.k_cache, *self.v_cache, *tables):
            torch._dynamo.mark_static_address(tensor)
        self.shape_buckets = (buckets(self.max_batch, 1), buckets(self.max_seq_len, 64))
        self.cuda_graphs = True
        self._step = torch.compile(self._decode_step, mode="reduce-overhead", dynamic=True)

    def eager_decode(self) -> None:
        """Decode steps without `torch.compile` (the default)."""
        self._step = self._decode_step
        self.shape_buckets = None
        self.cuda_graphs = False

    def _decode_step(
        self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        batch = token_ids.shape[0]
        span = mask.shape[-1]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * head_dim
        cos = self.cos[positions][:, None]
        sin = self.sin[positions][:, None]
        # Where each (sequence, KV head) writes in a layer's cache seen as rows of
        # head_dim: one index_copy_ per cache instead of a two-index index_put.
        rows = (self.batch_index[:batch, None] * kv_heads + self.kv_head_index) * self.max_seq_len
        rows = (rows + positions[:, None]).reshape(-1)
        x = self.embed(token_ids)
        for index in range(len(self.layers)):
            qkv = self.qkv[index].joint(self.input_norms[index](x))
            # q and k side by side take the rotary embedding in one pass.
            qk = qkv[:, :qk_width].view(batch, heads + kv_heads, head_dim)
            qk = qk * cos + _rotate_half(qk) * sin
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            k_cache.view(-1, head_dim).index_copy_(
                0, rows, qk[:, heads:].reshape(batch * kv_heads, head_dim)
            )
            v_cache.view(-1, head_dim).index_copy_(
                0, rows, qkv[:, qk_width:].reshape(batch * kv_heads, head_dim)
            )
            q = qk[:, :heads].reshape(batch, kv_heads, self.group, head_dim)
            out = F.scaled_dot_product_attention(
                q, k_cache[:batch, :, :span], v_cache[:batch, :, :span],
                attn_mask=mask, scale=self.scaling,
            )
            x = x + self.o_proj[index](out.reshape(batch, -1))[0]
            x = x + self._mlp(index, self.post_norms[index](x))
        return self._logits(x)

"""A lean forward pass for Llama-family models over a paged KV cache.

transformers' `generate` pays for generality on every token: cache objects,
mask construction, output dataclasses and hooks across 30 small layers. On a
2-core CPU that per-token overhead, not arithmetic, bounds decode speed. This
runner calls the model's own modules (so quantised drop-in replacements of
`nn.Linear` run their low-bit kernels) but does the bookkeeping itself:

* the KV cache is a pool of blocks (`kv_cache.py`) the runner is handed per
  call: a sequence's tokens live in the slots its block table names, new keys
  and values are written there, and attention gathers them back;
* a prefill can start after a cached prefix: only the new tokens are computed,
  in aligned chunks, attending over the prefix's keys already in the pool;
* rotary tables are computed once, and a decode step's slot lists once per step;
* decode attention runs per sequence, over exactly that sequence's tokens, and
  every projection computes each row on its own: a sequence's logits do not
  depend on which others share its batch (greedy output alone = batched, in
  bf16 too), and no step attends over padding;
* grouped-query attention at decode folds the query heads that share a KV head
  into the query-length axis, so keys are never repeated;
* q/k/v and gate/up run as one matmul each and bf16 weights are prepacked for
  oneDNN (`projections.py`), exactly where that gives the same numbers; the
  prepared modules replace the originals inside the model, so the weights are
  held once (but for a packed head tied to the embedding);
* where the model allows, a decode step is one native call
  (`native_decode.py`), the eager step below being the fallback and the
  reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import native_decode
from server.engine.kv_cache import KVCache, KVSpec
from server.engine.projections import Projection

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# A packed prefill's most tokens, by preference (int8's kernel computes rows on
# their own up to kernels.int8_kernel_rows(): 256 with AMX, else 32; int4's at any count).
PACK_ROWS = (128, 31)


@dataclass(frozen=True)
class _Span:
    """One sequence's part of a prefill: its tokens' slots, the first computed
    (`start`), its rows `lo:hi` in the step's activations, mask and rotary."""

    rows: torch.Tensor
    start: int
    lo: int
    hi: int
    mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


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


class LlamaRunner:
    """Runs prefill and batched decode for one model over a KV cache it is handed."""

    def __init__(
        self, model: nn.Module, *, max_seq_len: int, prepare: bool = True, prepack: bool = True,
        native: bool = True,
    ) -> None:
        """`prepare=False` runs the model's modules as they are: the reference
        the prepared (fused, prepacked) path is tested against. `prepack=False`
        fuses without oneDNN packing, for a runner that will be compiled.
        `native` decodes with the native step (`native_decode.py`) where the
        model allows it; that step reads plain bf16 weights, so it rules
        oneDNN packing out."""
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
        self.native_unsupported = (
            "not prepared" if not prepare
            else "disabled" if not native
            else "not bf16" if self.dtype != torch.bfloat16
            else native_decode.unsupported(model)
        )
        prepack = prepack and self.native_unsupported is not None

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
        self.max_seq_len = max_seq_len
        positions = torch.arange(max_seq_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            cos, sin = body.rotary_emb(probe, positions)
        self.cos = cos[0].to(self.dtype)
        self.sin = sin[0].to(self.dtype)
        # rotate_half(x) * sin == x.roll(half) * sin with the first half of sin
        # negated: the same products (negation is exact), two ops fewer per layer.
        half = self.head_dim // 2
        self.signed_sin = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
        self.key_positions = torch.arange(max_seq_len, device=self.device)
        self.pack_rows = self._pack_rows() if prepare else 0
        self._step = self._decode_step
        self.native: native_decode.NativeDecoder | None = None
        if self.native_unsupported is None:
            try:
                self.native = native_decode.NativeDecoder(self)
            except (ValueError, RuntimeError) as exc:  # a layout the checks did not foresee
                self.native_unsupported = str(exc)

    @torch.inference_mode()
    def _pack_rows(self) -> int:
        """Most tokens `prefill_packed` takes (0: it is not used): the first of
        PACK_ROWS at which each kind of projection computes the leading and
        trailing rows of a batch as it computes them alone, at row counts
        around every power of two below. quantserve's int8 and int4 CPU
        kernels compute every row on its own; oneDNN's bf16 matmul and torch's
        int4 kernel (from 32 rows) block by row count."""
        generator = torch.Generator().manual_seed(0)
        probes = [self.qkv[0], self.o_proj[0], self.gate_up[0], self.down[0], self.lm_head]
        for rows in PACK_ROWS:
            counts = sorted({c for p in range(8) for c in (2**p - 1, 2**p, 2**p + 1) if c < rows})
            for probe in probes:
                x = torch.randn(rows, int(probe.modules[0].in_features), generator=generator)
                x = x.to(self.dtype).to(self.device)
                together = probe.joint(x)
                if not all(
                    torch.equal(together[:c], probe.joint(x[:c]))
                    and torch.equal(together[rows - c :], probe.joint(x[rows - c :]))
                    for c in counts
                ):
                    break
            else:
                return rows
        return 0

    @property
    def kv_spec(self) -> KVSpec:
        return KVSpec(
            layers=len(self.layers), kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            dtype=self.dtype, device=self.device,
        )

    @property
    def prepared_weight_bytes(self) -> int:
        """Bytes preparation adds to the model's own: prepared modules replace the
        originals in the model, so this is only a packed head tied to the
        embedding, plus whatever else still holds replaced modules' tensors."""
        projections = [*self.qkv, *self.o_proj, *self.gate_up, *self.down, self.lm_head]
        return sum(p.weight_bytes for p in projections)

    def _mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[index](h)
        return self.down[index](self.act[index](gate) * up)[0]

    def _qkv_rows(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.qkv[index].joint(self.input_norms[index](x))

    def _post_attention_rows(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(index, self.post_norms[index](x))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))[0].float()

    @torch.inference_mode()
    def prefill(
        self, cache: KVCache, block_ids: list[int], token_ids: list[int], *, start: int = 0,
        chunk: int | None = None, all_logits: bool = False,
    ) -> torch.Tensor:
        """Write the KV of `token_ids[start:]` into the sequence's blocks, the
        first `start` tokens' KV being there already (a cached prefix).

        The work runs in chunks of `chunk` tokens (default: all at once)
        aligned to multiples of `chunk` from the first token, and `start` must
        be such a multiple. Each chunk runs through every layer before the
        next, attending over the earlier chunks' keys in the pool, so a step's
        activations are a chunk's, not the whole prompt's. Matmul kernels pick
        their blocking by row count, and attention's reductions run over the
        key span it is given, so aligned chunks are what make a prefill that
        starts after a cached prefix compute the very numbers a prefill from
        scratch computes.

        Returns float32 logits `[T - start, vocab]` when `all_logits` (prompt
        logprobs) else `[1, vocab]` for the last position only, sparing the
        vocab projection of every other prompt token.
        """
        total = len(token_ids)
        chunk = chunk or total
        if start % chunk or not 0 <= start < total:
            raise ValueError(f"prefill start {start} is not a chunk boundary below {total}")
        parts = [
            self._prefill_span(cache, block_ids, token_ids[: lo + chunk], lo, all_logits)
            for lo in range(start, total, chunk)
        ]
        return torch.cat(parts) if all_logits else parts[-1]

    @torch.inference_mode()
    def prefill_packed(
        self, cache: KVCache, prompts: list[tuple[list[int], list[int]]]
    ) -> torch.Tensor:
        """Prefill several sequences from scratch in one pass: `prompts` holds
        each one's `(block_ids, token_ids)`. Their tokens run through every
        projection as one matmul; attention stays per sequence. With at most
        `pack_rows` tokens in all, every logit is the one its sequence's own
        `prefill` computes. Returns float32 logits `[len(prompts), vocab]`,
        each sequence's last position's."""
        total = sum(len(tokens) for _, tokens in prompts)
        if not 0 < total <= self.pack_rows:
            raise ValueError(f"a packed prefill of {total} tokens (at most {self.pack_rows})")
        hidden = self._prefill_spans(cache, [(blocks, tokens, 0) for blocks, tokens in prompts])
        ends = torch.tensor([len(tokens) for _, tokens in prompts], device=self.device).cumsum(0)
        return self._logits(hidden[ends - 1])

    def _prefill_span(
        self, cache: KVCache, block_ids: list[int], token_ids: list[int], start: int,
        all_logits: bool,
    ) -> torch.Tensor:
        """`token_ids[start:]` through every layer, over the pool's keys of
        `token_ids[:start]`."""
        x = self._prefill_spans(cache, [(block_ids, token_ids, start)])
        return self._logits(x if all_logits else x[-1:])

    def _prefill_spans(
        self, cache: KVCache, spans: list[tuple[list[int], list[int], int]]
    ) -> torch.Tensor:
        """Each span's `token_ids[start:]` through every layer, over the pool's
        keys of its `token_ids[:start]`: the spans' rows side by side through
        the projections, attention per span. Returns the final hidden rows."""
        ids = torch.tensor(
            [t for _, tokens, start in spans for t in tokens[start:]],
            dtype=torch.long, device=self.device,
        )
        views: list[_Span] = []
        for block_ids, tokens, start in spans:
            lo = views[-1].hi if views else 0
            views.append(self._span(cache, block_ids, len(tokens), start, lo))
        x = self.embed(ids)
        for index in range(len(self.layers)):
            qkv = self._qkv_rows(index, x)
            outs = [self._span_attention(cache, index, qkv, view) for view in views]
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + self.o_proj[index].joint(out)
            x = x + self._post_attention_rows(index, x)
        return x

    def _span(self, cache: KVCache, block_ids: list[int], total: int, start: int, lo: int) -> _Span:
        # Query start + i sees keys 0..start + i.
        mask = (
            self.key_positions[:total][None]
            <= torch.arange(start, total, device=self.device)[:, None]
        )
        return _Span(
            rows=cache.slot_rows(block_ids, total), start=start, lo=lo, hi=lo + total - start,
            mask=mask, cos=self.cos[start:total][None, None], sin=self.sin[start:total][None, None],
        )

    def _span_attention(
        self, cache: KVCache, index: int, qkv: torch.Tensor, span: _Span
    ) -> torch.Tensor:
        """One span's attention in layer `index` (its keys and values written to
        the pool first): `[length, heads * head_dim]`."""
        length = span.hi - span.lo
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = qkv[span.lo : span.hi].split((q_width, kv_width, kv_width), dim=-1)
        q = q.view(1, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * span.cos + _rotate_half(q) * span.sin
        k = k * span.cos + _rotate_half(k) * span.sin
        k_cache, v_cache = cache.k[index], cache.v[index]
        k_cache.index_copy_(0, span.rows[span.start :], k[0].transpose(0, 1))
        v_cache.index_copy_(0, span.rows[span.start :], v[0].transpose(0, 1))
        # Keys as one contiguous [1, kv_heads, T, head_dim] tensor either way:
        # attention's kernel path depends on the layout, and so do its numbers.
        prefix = span.rows[: span.start]
        k = torch.cat([k_cache.index_select(0, prefix).transpose(0, 1)[None], k], dim=2)
        v = torch.cat([v_cache.index_select(0, prefix).transpose(0, 1)[None], v], dim=2)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=span.mask, scale=self.scaling, enable_gqa=self.group > 1,
        ).transpose(1, 2).reshape(length, -1)

    @torch.inference_mode()
    def decode(
        self, cache: KVCache, token_ids: torch.Tensor, positions: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode step for a batch of sequences.

        `token_ids` is a `[B]` long tensor of each sequence's newest token,
        `positions[i]` where it goes (the sequence's length so far) and
        `block_tables[i]` the sequence's blocks, with room for it. Returns
        float32 logits `[B, vocab]`.
        """
        if self.native is not None and self.native.serves(cache):
            return self.native.step(cache, token_ids, positions, block_tables)
        size = cache.block_size
        keys: list[torch.Tensor | slice] = []
        slots: list[int] = []
        for table, position in zip(block_tables, positions, strict=True):
            slots.append(table[position // size] * size + position % size)
            first = table[0]
            if table == list(range(first, first + len(table))):
                # Blocks in a row (a sequence that grew alone): its keys are a view.
                keys.append(slice(first * size, first * size + position + 1))
            else:
                keys.append(cache.slot_rows(table, position + 1))
        write = torch.tensor(slots, dtype=torch.long, device=self.device)
        at = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self._step(cache.k, cache.v, token_ids, at, write, keys)

    def compile_decode(self) -> None:
        """Run decode steps through `torch.compile` (inductor) from now on.

        Batch size and attention spans are dynamic dimensions; the compilation
        itself happens on the first calls, which is why the caller runs them
        at warm-up. `eager_decode` undoes it.
        """
        self._step = torch.compile(self._decode_step, dynamic=True)
        self.native = None

    def eager_decode(self) -> None:
        """Decode steps without `torch.compile` (the default)."""
        self._step = self._decode_step

    def _attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        keys: torch.Tensor | slice,
    ) -> torch.Tensor:
        """One sequence's decode attention: `q` `[kv_heads, group, head_dim]` over
        its own keys, a run of slots or gathered from theirs (the same layout
        either way, so the same numbers)."""
        if isinstance(keys, slice):
            k, v = k_cache[keys], v_cache[keys]
        else:
            k, v = k_cache.index_select(0, keys), v_cache.index_select(0, keys)
        # 4-D, as at prefill: torch's fused CPU attention kernel takes 4-D
        # inputs only; 3-D ones ran the unfused path (~10 ops, ~2x the time).
        return F.scaled_dot_product_attention(
            q[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=self.scaling
        )[0]

    def _decode_step(
        self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
        token_ids: torch.Tensor, positions: torch.Tensor, write: torch.Tensor,
        keys: list[torch.Tensor | slice],
    ) -> torch.Tensor:
        batch = token_ids.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * head_dim
        half = head_dim // 2
        cos = self.cos[positions][:, None]
        sin = self.signed_sin[positions][:, None]
        x = self.embed(token_ids)
        for index in range(len(self.layers)):
            qkv = self.qkv[index].joint(self.input_norms[index](x))
            # q and k side by side take the rotary embedding in one pass.
            qk = qkv[:, :qk_width].view(batch, heads + kv_heads, head_dim)
            qk = qk * cos + qk.roll(half, -1) * sin
            k_cache, v_cache = k_caches[index], v_caches[index]
            k_cache.index_copy_(0, write, qk[:, heads:])
            v_cache.index_copy_(0, write, qkv[:, qk_width:].view(batch, kv_heads, head_dim))
            q = qk[:, :heads].view(batch, kv_heads, self.group, head_dim)
            outs = [self._attend(q[i], k_cache, v_cache, r) for i, r in enumerate(keys)]
            out = outs[0] if batch == 1 else torch.cat(outs)
            x = x + self.o_proj[index](out.reshape(batch, -1))[0]
            x = x + self._mlp(index, self.post_norms[index](x))
        return self._logits(x)

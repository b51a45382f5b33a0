"""A lean runner's decode step as one native call, where the model allows it.

`quantizers/kernels/decoder.cpp` runs every layer of a step in C++ (norms,
rotary, the paged KV write, attention, residuals, the head) on the weights the
runner prepared, read in place. Eager, a SmolLM2 step dispatched ~30 small
torch ops per layer from Python; their overhead, not the weights' streaming,
set the decode speed.

It serves bf16 models on CPU whose projections are all bf16, int8 weight-only
or int4 weight-only (where quantserve's int4 kernel reads them), with a SiLU
MLP and a bf16 KV pool. Anything else decodes on the eager path, which stays
the reference the native step is tested against.

LoRA: while adapters are resident the runner's projections are wrapped
(`lora.LoraProjection`); the step then hands the wrapped groups' stacked
factors to the decoder (once per adapter set) and each row's adapter slot
(every step), and the decoder adds each row's low-rank delta itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from quantizers import kernels
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from server.engine.projections import FusedPart, PlainLinear

if TYPE_CHECKING:
    from server.engine.kv_cache import KVCache
    from server.engine.llama_runner import LlamaRunner

KIND_BF16, KIND_INT8, KIND_INT4 = 0, 1, 2
HEAD_LAYER = -1


def _linear_kind(module: nn.Module) -> int | None:
    """The native kernel that computes `module`, if any."""
    if isinstance(module, FusedPart):
        # Installed by an earlier runner over this model (a swap to the same
        # model): the native step reads the whole fused module.
        return _linear_kind(module.fused)
    if isinstance(module, Int8WeightOnlyLinear):
        return KIND_INT8 if module.weight.device.type == "cpu" else None
    if isinstance(module, Int4WeightOnlyLinear):
        packed = module.packed if module.packed is not None else module.tail_packed
        return KIND_INT4 if module.layout == "cpu" and kernels.own_int4(packed) else None
    weight = getattr(module, "weight", None)
    plain = isinstance(module, nn.Linear | PlainLinear) and isinstance(weight, Tensor)
    if plain and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        return KIND_BF16
    return None


def unsupported(model: nn.Module) -> str | None:
    """Why the native step cannot run `model` as loaded (None: it can)."""
    config = model.config
    if not kernels.available():
        return "quantserve's CPU kernels are not available"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (native: silu)"
    layers = list(model.model.layers)
    norms = [model.model.norm] + [
        norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    if any(n.weight.dtype != torch.bfloat16 or n.weight.device.type != "cpu" for n in norms):
        return "norm weights are not bf16 on CPU"
    if len({float(n.variance_epsilon) for n in norms}) != 1:
        return "norms with different epsilons"
    for layer in layers:
        for owner, name in (
            *((layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *((layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")),
        ):
            module = getattr(owner, name)
            if _linear_kind(module) is None:
                return f"{name} is a {type(module).__name__} without a native kernel"
    if _linear_kind(model.lm_head) is None:
        return f"lm_head is a {type(model.lm_head).__name__} without a native kernel"
    return None


def _linear_args(module: nn.Module) -> tuple[int, list[Tensor], list[int]]:
    kind = _linear_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} has no native kernel")
    bias = getattr(module, "bias", None)
    meta = [int(module.in_features), int(module.out_features), int(bias is not None)]
    if kind == KIND_BF16:
        tensors = [module.weight.detach()]
    elif kind == KIND_INT8:
        tensors = [module.weight, module.scale]
    else:
        tensors = [
            t for t in (module.packed, module.scales_and_zeros, module.tail_packed,
                        module.tail_scales_and_zeros) if t is not None
        ]
        meta += [module.group_size, module.main_in, module.tail_in, module.padded_out]
    if bias is not None:
        tensors.append(bias.detach().to(torch.bfloat16))
    return kind, [t.contiguous() for t in tensors], meta


def _modules(projection: Any) -> Sequence[nn.Module]:
    """What a runner's projection computes: its prepared module, or its parts
    (the parts of one fused module, in order, as that module)."""
    if projection.prepared is not None:
        return [projection.prepared]
    parts = projection.modules
    if all(isinstance(p, FusedPart) for p in parts):
        fused = parts[0].fused
        bounds = [(p.start, p.stop) for p in parts]
        stops = [0, *(stop for _, stop in bounds)]
        whole = all(p.fused is fused for p in parts) and stops[-1] == fused.out_features
        if whole and all(start == stops[i] for i, (start, _) in enumerate(bounds)):
            return [fused]
    if any(isinstance(p, FusedPart) for p in parts):
        raise ValueError("parts of a fused projection that do not make it up whole")
    return parts


class NativeDecoder:
    """Holds the native decoder built over one runner's prepared weights."""

    def __init__(self, runner: LlamaRunner) -> None:
        model = runner.model
        body = model.model
        self.runner = runner
        self.decoder = torch.classes.quantserve.LlamaDecoder(
            runner.num_heads, runner.num_kv_heads, runner.head_dim,
            float(body.norm.variance_epsilon), runner.scaling,
            runner.cos.contiguous(), runner.signed_sin.contiguous(), body.norm.weight.detach(),
        )
        groups = (runner.qkv, runner.o_proj, runner.gate_up, runner.down)
        for index, layer in enumerate(runner.layers):
            self.decoder.add_layer(
                layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
            )
            for slot, group in enumerate(groups):
                for module in _modules(group[index]):
                    self.decoder.add_linear(index, slot, *_linear_args(module))
        for module in _modules(runner.lm_head):
            self.decoder.add_linear(HEAD_LAYER, 0, *_linear_args(module))
        # The projections the decoder read, in (slot, layer) order, the head last.
        self._sites = self._current()
        self._wrapped: list[tuple[int, Any]] = []  # LoRA wrappers found by `serves`
        self._lora_set: object | None = None

    def _current(self) -> list[Any]:
        r = self.runner
        return [*r.qkv, *r.o_proj, *r.gate_up, *r.down, r.lm_head]

    def _position(self, index: int) -> tuple[int, int]:
        """(layer, slot) of entry `index` of `_current()` (layer -1: the head)."""
        layers = len(self.runner.layers)
        if index == len(self._sites) - 1:
            return HEAD_LAYER, 0
        return index % layers, index // layers

    def serves(self, cache: KVCache) -> bool:
        """Whether this step can run now: a bf16 pool, and the runner's own
        projections, bare or in a LoRA wrapper (noted for `_row_slots`)."""
        if cache.storage is None:
            return False
        self._wrapped = []
        for index, (now, site) in enumerate(zip(self._current(), self._sites, strict=True)):
            if now is site:
                continue
            if getattr(now, "inner", None) is not site:
                return False
            self._wrapped.append((index, now))
        return True

    def _row_slots(self, batch: int) -> Tensor:
        """Each row's adapter slot, after handing the decoder the current
        adapter set's stacks if it changed (the wrappers `serves` just found)."""
        wrapped = self._wrapped
        state = wrapped[0][1].state if wrapped else None
        current = None if state is None else state.current
        if current is not self._lora_set:
            self.decoder.clear_lora()
            for index, wrapper in wrapped if current is not None else []:
                stacks = current.stacks.get(wrapper.key)
                if stacks is not None:
                    self.decoder.set_lora(*self._position(index), *stacks)
            self._lora_set = current
        if state is None or not state.rows:
            return torch.empty(0, dtype=torch.long)
        if len(state.rows) != batch:
            raise RuntimeError("LoRA rows were not selected for this decode step")
        return torch.tensor(state.rows)

    def step(
        self, cache: KVCache, token_ids: Tensor, positions: list[int],
        block_tables: list[list[int]],
    ) -> Tensor:
        """One decode step; `serves(cache)` must have said yes just before."""
        width = max(len(table) for table in block_tables)
        tables = torch.tensor([table + [0] * (width - len(table)) for table in block_tables])
        return self.decoder.step(
            self.runner.embed(token_ids), torch.tensor(positions), tables, cache.storage,
            cache.block_size, self._row_slots(len(positions)),
        )

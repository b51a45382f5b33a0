"""What a model variant costs in memory: bytes and bits per weight.

Bits per weight are given twice. Over the quantisable linear weights they show
what a method does to the layers it touches (32 for float32, ~8.0 for int8
with per-channel scales, ~4.3 for int4 g128 with scales and zeros). Over the
whole model they show what a user actually saves: norms stay in 16-bit, and
so does the embedding table unless a method stores it quantised (int8 and
int4 keep a tied table as int8 codes shared with lm_head, which the linear
figure leaves out because it counts that matrix as the embedding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from quantizers.loading import weight_bytes


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)


def linear_weight_counts(model: torch.nn.Module) -> dict[str, int]:
    """Module name -> weight element count of every nn.Linear whose weight is
    its own (a head tied to the embeddings is the embedding table, not a
    separate linear weight, so it is left out).

    Taken from the float model before quantisation: afterwards the layers are
    runtime modules holding packed buffers, and only the names survive.
    """
    embedding_keys = {
        _storage_key(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }
    return {
        name: module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _storage_key(module.weight) not in embedding_keys
    }


@dataclass(frozen=True)
class SizeReport:
    weight_bytes: int
    linear_bytes: int
    linear_weights: int
    params: int
    bits_per_weight_linear: float
    bits_per_weight: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_report(model: torch.nn.Module, linear_counts: dict[str, int], params: int) -> SizeReport:
    """Sizes of `model` now, given the linear layers and parameter count of the
    float model it came from (`linear_weight_counts`, the float param count)."""
    modules = dict(model.named_modules())
    linear_bytes = sum(weight_bytes(modules[name]) for name in linear_counts if name in modules)
    linear_weights = sum(linear_counts.values())
    total = weight_bytes(model)
    return SizeReport(
        weight_bytes=total,
        linear_bytes=linear_bytes,
        linear_weights=linear_weights,
        params=params,
        bits_per_weight_linear=8 * linear_bytes / linear_weights if linear_weights else 0.0,
        bits_per_weight=8 * total / params if params else 0.0,
    )

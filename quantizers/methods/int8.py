"""`int8`: weight-only round-to-nearest, symmetric per output channel.

Per-channel int8 is near-lossless for LLM weights (outliers live in
activations, not weights), needs no calibration and quantises SmolLM2 in about
a second. The output head is quantised too by default: a head tied to the
embeddings becomes int8 codes that the embedding lookup shares, so the
[vocab, hidden] matrix is stored once, at a quarter of its float32 size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantizers.registry import (
    HEAD_INCLUDED_SKIP,
    LayerTarget,
    MethodConfig,
    QuantContext,
    register_method,
)
from quantizers.runtime.int8 import Int8WeightOnlyLinear


@dataclass(frozen=True)
class Int8Config(MethodConfig):
    """No knobs beyond the layer selection shared by all methods; the default
    skip list keeps only embeddings and norms in float (lm_head is quantised)."""

    skip: tuple[str, ...] = HEAD_INCLUDED_SKIP


@register_method("int8", Int8Config)
def apply_int8(model: nn.Module, config: Int8Config, ctx: QuantContext) -> None:
    def build(target: LayerTarget) -> nn.Module:
        return Int8WeightOnlyLinear.from_float(target.module)

    ctx.quantize_layers(build)

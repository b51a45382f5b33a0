"""`int8`: weight-only round-to-nearest, symmetric per output channel.

Per-channel int8 is near-lossless for LLM weights (outliers live in
activations, not weights), needs no calibration and quantises SmolLM2 in about
a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantizers.registry import LayerTarget, MethodConfig, QuantContext, register_method
from quantizers.runtime.int8 import Int8WeightOnlyLinear


@dataclass(frozen=True)
class Int8Config(MethodConfig):
    """No knobs beyond the layer selection shared by all methods."""


@register_method("int8", Int8Config)
def apply_int8(model: nn.Module, config: Int8Config, ctx: QuantContext) -> None:
    def build(target: LayerTarget) -> nn.Module:
        return Int8WeightOnlyLinear.from_float(target.module)

    ctx.quantize_layers(build)

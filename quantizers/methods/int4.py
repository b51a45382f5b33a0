"""`int4`: group-wise weight-only round-to-nearest, asymmetric 4-bit.

Smaller groups track local weight ranges better (g32 is near-lossless on
SmolLM2, whose GGUF source is itself Q4_1 with groups of 32) at the cost of
more scale/zero bytes; g128 is the common compact default.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantizers.errors import ConfigError
from quantizers.registry import (
    HEAD_INCLUDED_SKIP,
    LayerTarget,
    MethodConfig,
    QuantContext,
    check_choice,
    register_method,
)
from quantizers.runtime.int4 import GROUP_SIZES, Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear


@dataclass(frozen=True)
class Int4Config(MethodConfig):
    """group_size: input channels sharing one scale/zero (32, 64 or 128).

    pad: allow layers whose input size the group size does not divide (their
    last, partial group gets its own narrower kernel group, see
    Int4WeightOnlyLinear); with pad=False such a layer is a ConfigError naming
    group_size.

    The output head (quantised by default, like every linear but embeddings and
    norms) is int8 per row, tied or not. A tied head must be: the shared matrix
    also serves embedding row lookups, which the opaque int4 kernel packing
    cannot and int8 codes can (Int8Embedding). An untied head gets int8 too, as
    llama.cpp keeps its output tensor at higher precision in 4-bit files: its
    error lands directly on every logit, and it is one layer, so 8 bits there
    cost few bytes. Put "lm_head" in `skip` to keep it in bfloat16 instead.
    """

    skip: tuple[str, ...] = HEAD_INCLUDED_SKIP
    group_size: int = 128
    pad: bool = True

    def validate(self) -> None:
        super().validate()
        check_choice(self.group_size, GROUP_SIZES, "group_size")
        check_choice(self.pad, (True, False), "pad")


@register_method("int4", Int4Config)
def apply_int4(model: nn.Module, config: Int4Config, ctx: QuantContext) -> None:
    def build(target: LayerTarget) -> nn.Module:
        if target.name == ctx.output_head:
            return Int8WeightOnlyLinear.from_float(target.module)
        group_size = target.config.group_size
        if not target.config.pad and target.module.in_features % group_size:
            raise ConfigError(
                f"group_size {group_size} does not divide in_features "
                f"{target.module.in_features} and pad is false",
                "group_size",
            )
        return Int4WeightOnlyLinear.from_float(target.module, group_size)

    ctx.quantize_layers(build)

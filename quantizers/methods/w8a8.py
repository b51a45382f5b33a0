"""`w8a8-dynamic` and `w8a8-static`: int8 weights and int8 activations.

Dynamic computes one activation scale per token at run time and needs no
calibration. Static fixes one (scale, zero point) per layer input from the
calibration batches' observed range: cheaper at run time, but LLM activations
have a few outlier channels that stretch the range and cost resolution for
every other channel — the baseline SmoothQuant improves on.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantizers.calibration import collect_activation_stats
from quantizers.registry import LayerTarget, MethodConfig, QuantContext, register_method
from quantizers.runtime.w8a8 import W8A8Linear


@dataclass(frozen=True)
class W8A8DynamicConfig(MethodConfig):
    """No knobs beyond the layer selection shared by all methods."""


@dataclass(frozen=True)
class W8A8StaticConfig(MethodConfig):
    """Needs calibration batches; no other knobs."""


@register_method("w8a8-dynamic", W8A8DynamicConfig)
def apply_w8a8_dynamic(model: nn.Module, config: W8A8DynamicConfig, ctx: QuantContext) -> None:
    def build(target: LayerTarget) -> nn.Module:
        return W8A8Linear.from_float(target.module)

    ctx.quantize_layers(build)


@register_method("w8a8-static", W8A8StaticConfig)
def apply_w8a8_static(model: nn.Module, config: W8A8StaticConfig, ctx: QuantContext) -> None:
    batches = ctx.require_calibration()
    stats = collect_activation_stats(model, batches, [t.name for t in ctx.targets])

    def build(target: LayerTarget) -> nn.Module:
        observed = stats[target.name]
        return W8A8Linear.from_float(
            target.module, (float(observed.min.min()), float(observed.max.max()))
        )

    ctx.quantize_layers(build)
    ctx.extra["calibration_tokens"] = sum(int(b.numel()) for b in batches)

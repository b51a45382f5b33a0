"""`smoothquant`: move activation outliers into the weights, then W8A8.

A few input channels of LLM linears carry activations 10-100x larger than
the rest, so an int8 activation grid wastes its resolution on them.
SmoothQuant divides each input channel by s = amax_x**alpha / amax_w**(1-alpha)
and multiplies the matching weight column by s, which leaves the float result
unchanged and splits the difficulty between activations and weights. The
division is folded into the op that produces the input (a norm's weight for
the linears it feeds, up_proj's rows for down_proj: `smooth_groups.py`), so it is free at run time.

alpha is either fixed, or (default) chosen per group from ALPHA_GRID by the
W8A8 output error on sampled calibration rows: a local search on rows kept
from one calibration pass, never another forward of the model.

Activations are quantised per token at run time by default ("dynamic", the
paper's O3-style granularity): on SmolLM2 some tokens carry 1000x "massive
activations" that no single per-tensor scale can serve, and smoothing cannot
move a token's magnitude into the weights. "static" (per-tensor, calibrated,
the paper's O1..O2 style) is kept as an option and chooses its range as
w8a8-static does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from quantizers.calibration import ActivationStats
from quantizers.methods.smooth_groups import SmoothGroup, smoothing_plan
from quantizers.methods.w8a8 import (
    CALIBRATION_TOKENS,
    RANGE_ROWS,
    calibrate,
    calibrated_range,
    check_calibration_tokens,
    static_ranges,
)
from quantizers.primitives import (
    dequantize_per_channel,
    quantize_per_channel_symmetric,
    quantize_per_token_symmetric,
)
from quantizers.registry import (
    LayerTarget,
    MethodConfig,
    QuantContext,
    check_choice,
    check_range,
    register_method,
)
from quantizers.runtime.w8a8 import W8A8Linear, quantize_static, static_activation_params

ALPHA_GRID = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)
# Sampled input rows per smoothing group that score the alpha candidates.
SEARCH_ROWS = 256
_EPS = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    """alpha: migration strength in [0, 1], or None to search ALPHA_GRID per group.
    activations: "dynamic" (per token at run time) or "static" (calibrated per tensor).
    calibration_tokens: at most this many calibration tokens are run."""

    alpha: float | None = None
    activations: Literal["dynamic", "static"] = "dynamic"
    calibration_tokens: int = CALIBRATION_TOKENS

    def validate(self) -> None:
        super().validate()
        if self.alpha is not None:
            check_range(self.alpha, 0.0, 1.0, "alpha")
        check_choice(self.activations, ("static", "dynamic"), "activations")
        check_calibration_tokens(self.calibration_tokens)


def smoothing_factors(act_abs_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """Per input channel s = amax_x**alpha / amax_w**(1-alpha), over all consumers."""
    w_abs_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    factors = act_abs_max.clamp_min(_EPS) ** alpha / w_abs_max.clamp_min(_EPS) ** (1 - alpha)
    return factors.clamp_min(_EPS)


def fake_quantize_input(
    rows: Tensor, stats: ActivationStats, weights: list[Tensor], factors: Tensor, mode: str
) -> Tensor:
    """The smoothed rows as the W8A8 runtime will see them after int8 rounding.

    weights are the consumers' smoothed weights (they weigh the static range search).
    """
    x = rows / factors
    if mode == "dynamic":
        q, scale = quantize_per_token_symmetric(x)
        return q.float() * scale
    scale, zero = static_activation_params(*calibrated_range(stats, weights, factors).bounds)
    return (quantize_static(x, scale, zero).float() - zero) * scale


def smoothing_loss(
    rows: Tensor,
    references: list[Tensor],
    stats: ActivationStats,
    weights: list[Tensor],
    factors: Tensor,
    mode: str,
) -> float:
    """Relative squared error of the W8A8 outputs after smoothing, summed over consumers.

    references: each consumer's float output on `rows`, computed once per group.
    """
    smoothed = [w.detach().float() * factors for w in weights]
    x_q = fake_quantize_input(rows, stats, smoothed, factors, mode)
    loss = 0.0
    for weight, reference in zip(smoothed, references, strict=True):
        w_q = dequantize_per_channel(*quantize_per_channel_symmetric(weight))
        loss += float((x_q @ w_q.t() - reference).square().sum() / reference.square().sum())
    return loss


def choose_alpha(
    group: SmoothGroup, stats: ActivationStats, weights: list[Tensor], config: SmoothQuantConfig
) -> tuple[float, Tensor, dict[float, float]]:
    """The alpha, its factors, and the loss of every alpha tried (empty when fixed)."""
    if config.alpha is not None:
        return config.alpha, smoothing_factors(stats.abs_max, weights, config.alpha), {}
    if stats.rows is None:
        raise ValueError(f"no calibration rows were sampled for group {group.name}")
    rows = stats.rows[:SEARCH_ROWS].float()
    references = [rows @ w.detach().float().t() for w in weights]
    losses: dict[float, float] = {}
    candidates: dict[float, Tensor] = {}
    for alpha in ALPHA_GRID:
        candidates[alpha] = smoothing_factors(stats.abs_max, weights, alpha)
        losses[alpha] = smoothing_loss(
            rows, references, stats, weights, candidates[alpha], config.activations
        )
    best = min(losses, key=losses.__getitem__)
    return best, candidates[best], losses


def smooth(model: nn.Module, group: SmoothGroup, factors: Tensor) -> None:
    """Fold 1/factors into the producers and factors into the consumers' columns."""
    for tensor in group.producers:
        shape = (-1, *([1] * (tensor.dim() - 1)))
        tensor.data.div_(factors.to(tensor.dtype).view(shape))
    for name in group.consumers:
        weight = model.get_submodule(name).weight
        weight.data.mul_(factors.to(weight.dtype)[None, :])


@register_method("smoothquant", SmoothQuantConfig, calibrated=True)
def apply_smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: QuantContext) -> None:
    target_names = {t.name for t in ctx.targets}
    found, refused = smoothing_plan(model)
    groups = [g for g in found if target_names & set(g.consumers)]
    hooked = sorted(target_names | {c for g in groups for c in g.consumers})
    static = config.activations == "static"
    if static:
        stats = calibrate(model, ctx, config.calibration_tokens, hooked, RANGE_ROWS)
    else:
        searched = [g.consumers[0] for g in groups] if config.alpha is None else []
        stats = calibrate(model, ctx, config.calibration_tokens, hooked, SEARCH_ROWS, searched)
    chosen_alpha: dict[str, float] = {}
    factors_of: dict[str, Tensor] = {}
    for group in groups:
        ctx.check_cancel()
        with ctx.layer_errors(group.consumers[0]):
            weights = [model.get_submodule(c).weight for c in group.consumers]
            alpha, factors, _ = choose_alpha(group, stats[group.consumers[0]], weights, config)
            smooth(model, group, factors)
        chosen_alpha[group.name] = alpha
        factors_of.update(dict.fromkeys(group.consumers, factors))

    ranges = static_ranges(ctx, stats, factors_of) if static else {}
    stats.clear()

    def build(target: LayerTarget) -> nn.Module:
        chosen = ranges.get(target.name)
        return W8A8Linear.from_float(target.module, chosen.bounds if chosen else None)

    ctx.quantize_layers(build)
    for name, chosen in ranges.items():
        ctx.layers[name].update(chosen.report())
    ctx.extra["alpha"] = chosen_alpha
    not_smoothed = {name: why for name, why in refused.items() if name in target_names}
    if not_smoothed:
        ctx.extra["not_smoothed"] = not_smoothed

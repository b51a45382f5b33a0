"""`smoothquant`: move activation outliers into the weights, then W8A8.

A few input channels of LLM linears carry activations 10-100x larger than
the rest, so a per-tensor int8 activation grid wastes its resolution on them.
SmoothQuant divides each input channel by s = amax_x**alpha / amax_w**(1-alpha)
and multiplies the matching weight column by s, which leaves the float result
unchanged and splits the difficulty between activations and weights. The
division is folded into the op that produces the input (the RMSNorm weight for
q/k/v and gate/up, the up_proj rows for down_proj), so it is free at run time.

alpha is either fixed, or (default) chosen per group from 0.5..0.85 by the
quantised output error on sampled calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantizers.calibration import ActivationStats, collect_activation_stats
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
SEARCH_ROWS = 512
_EPS = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    """alpha: migration strength in [0, 1], or None to search ALPHA_GRID per group.
    activations: "static" (calibrated per-tensor, the classic setting) or "dynamic"."""

    alpha: float | None = None
    activations: str = "static"

    def validate(self) -> None:
        super().validate()
        if self.alpha is not None:
            check_range(self.alpha, 0.0, 1.0, "alpha")
        check_choice(self.activations, ("static", "dynamic"), "activations")


@dataclass
class SmoothGroup:
    """Linears sharing one input, and the tensor whose output dim produces it."""

    name: str
    producer: Tensor
    producer_is_rows: bool
    consumers: list[str]


def find_groups(model: nn.Module) -> list[SmoothGroup]:
    """The foldable groups of every Llama-style decoder layer."""
    groups = []
    for name, layer in model.named_modules():
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        norm_in = getattr(layer, "input_layernorm", None)
        norm_post = getattr(layer, "post_attention_layernorm", None)
        if attn is None or mlp is None or norm_in is None or norm_post is None:
            continue
        qkv = [f"{name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        gate_up = [f"{name}.mlp.{p}" for p in ("gate_proj", "up_proj")]
        groups += [
            SmoothGroup(f"{name}.input_layernorm", norm_in.weight, False, qkv),
            SmoothGroup(f"{name}.post_attention_layernorm", norm_post.weight, False, gate_up),
            SmoothGroup(f"{name}.mlp.up_proj", mlp.up_proj.weight, True, [f"{name}.mlp.down_proj"]),
        ]
    return groups


def smoothing_factors(act_abs_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    w_abs_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    factors = act_abs_max.clamp_min(_EPS) ** alpha / w_abs_max.clamp_min(_EPS) ** (1 - alpha)
    return factors.clamp_min(_EPS)


def _fake_quant_input(x: Tensor, stats: ActivationStats, factors: Tensor, mode: str) -> Tensor:
    if mode == "dynamic":
        q, scale = quantize_per_token_symmetric(x)
        return q.float() * scale
    scale, zero = static_activation_params(
        float((stats.min / factors).min()), float((stats.max / factors).max())
    )
    return (quantize_static(x, scale, zero).float() - zero) * scale


def smoothing_loss(
    rows: Tensor, stats: ActivationStats, weights: list[Tensor], factors: Tensor, mode: str
) -> float:
    """Relative squared error of the W8A8 outputs after smoothing, summed over consumers."""
    x_q = _fake_quant_input(rows / factors, stats, factors, mode)
    loss = 0.0
    for weight in weights:
        w = weight.detach().float()
        reference = rows @ w.t()
        w_q = dequantize_per_channel(*quantize_per_channel_symmetric(w * factors))
        loss += float((x_q @ w_q.t() - reference).square().sum() / reference.square().sum())
    return loss


def _choose_alpha(
    group: SmoothGroup, stats: ActivationStats, weights: list[Tensor], config: SmoothQuantConfig
) -> tuple[float, Tensor]:
    if config.alpha is not None:
        return config.alpha, smoothing_factors(stats.abs_max, weights, config.alpha)
    if stats.rows is None:
        raise ValueError(f"no calibration rows were sampled for group {group.name}")
    scored = []
    for alpha in ALPHA_GRID:
        factors = smoothing_factors(stats.abs_max, weights, alpha)
        loss = smoothing_loss(stats.rows, stats, weights, factors, config.activations)
        scored.append((loss, alpha, factors))
    _, alpha, factors = min(scored, key=lambda item: item[0])
    return alpha, factors


def _smooth(
    model: nn.Module, group: SmoothGroup, factors: Tensor, stats: list[ActivationStats]
) -> None:
    """Fold 1/factors into the producer and factors into the consumers' columns."""
    if group.producer_is_rows:
        group.producer.data.div_(factors.to(group.producer.dtype)[:, None])
    else:
        group.producer.data.div_(factors.to(group.producer.dtype))
    for name in group.consumers:
        weight = model.get_submodule(name).weight
        weight.data.mul_(factors.to(weight.dtype)[None, :])
    for item in stats:
        item.min, item.max = item.min / factors, item.max / factors
        item.abs_max = item.abs_max / factors


@register_method("smoothquant", SmoothQuantConfig)
def apply_smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: QuantContext) -> None:
    batches = ctx.require_calibration()
    target_names = {t.name for t in ctx.targets}
    groups = [g for g in find_groups(model) if target_names & set(g.consumers)]
    hooked = sorted(target_names | {c for g in groups for c in g.consumers})
    stats = collect_activation_stats(
        model,
        batches,
        hooked,
        keep_rows=SEARCH_ROWS if config.alpha is None else 0,
        rows_for={g.consumers[0] for g in groups},
    )
    chosen: dict[str, float] = {}
    for group in groups:
        ctx.check_cancel()
        with ctx.layer_errors(group.consumers[0]):
            weights = [model.get_submodule(c).weight for c in group.consumers]
            alpha, factors = _choose_alpha(group, stats[group.consumers[0]], weights, config)
            _smooth(model, group, factors, [stats[c] for c in group.consumers])
            stats[group.consumers[0]].rows = None
        chosen[group.name] = alpha

    def build(target: LayerTarget) -> nn.Module:
        if config.activations == "dynamic":
            return W8A8Linear.from_float(target.module)
        observed = stats[target.name]
        return W8A8Linear.from_float(
            target.module, (float(observed.min.min()), float(observed.max.max()))
        )

    ctx.quantize_layers(build)
    ctx.extra["alpha"] = chosen
    ctx.extra["calibration_tokens"] = sum(int(b.numel()) for b in batches)

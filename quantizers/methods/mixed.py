"""`mixed`: a bit width per layer (int4 / int8 / float) chosen to meet a budget.

Layers differ widely in how much their quantisation hurts (SmolLM2's early
MLP projections far more than most attention projections), so a uniform width
wastes bytes where they buy nothing. Each layer's sensitivity at each width is
measured on calibration data (quantizers.methods.sensitivity: the KL from the
float model when only that layer is quantised), then a knapsack
(quantizers.methods.bit_allocation) picks the widths: least summed KL within a
memory budget, or fewest bytes within a quality budget.

A tied lm_head (a target under the default skip list, like int4's) is stored
as int8 codes shared with the embeddings and stays outside the knapsack: the
budgets count the other linear layers, the ones `bits/w linear` reports, so
mixed rows compare with the uniform int4/int8 rows on the same bytes.

The chosen plan goes into the report (`extra["mixed"]`) with the overrides that
reproduce it: passing them back as this config's `overrides` fixes every
layer's width, and then no calibration data is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from quantizers.errors import ConfigError
from quantizers.methods.bit_allocation import Allocator, BudgetUnreachable, LayerOption, Plan
from quantizers.methods.column_grid import rtn_weight
from quantizers.methods.sensitivity import measured_sensitivities
from quantizers.registry import (
    HEAD_INCLUDED_SKIP,
    LayerTarget,
    MethodConfig,
    QuantContext,
    check_choice,
    check_range,
    register_method,
)
from quantizers.runtime.int4 import GROUP_SIZES, Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear

FLOAT_BITS = 16
WIDTHS = (4, 8, FLOAT_BITS)
_BUDGET_FIELDS = ("target_bits_per_weight", "max_weight_bytes", "max_ppl_increase_pct")


@dataclass(frozen=True)
class MixedConfig(MethodConfig):
    """Budgets (at least one): target_bits_per_weight (stored bits, scales
    included, averaged over the knapsack's layers), max_weight_bytes (of those
    layers) and max_ppl_increase_pct (estimated from the summed sensitivities).

    widths: the widths a layer may take (16 = float, served in bfloat16).
    bits: fixes a layer's width; meant for per-layer overrides (the plan).
    group_size: int4 group size. sensitivity_samples / sensitivity_seq_len:
    calibration sequences (evenly spaced over the calibration set) and their
    first tokens the KLs are measured on; every token costs about 420
    half-model forward passes on SmolLM2, so the default 2 x 64 tokens take
    about 2 minutes on one core (3 x 56 took 175 CPU seconds on a shared one).
    """

    skip: tuple[str, ...] = HEAD_INCLUDED_SKIP
    target_bits_per_weight: float | None = None
    max_weight_bytes: int | None = None
    max_ppl_increase_pct: float | None = None
    widths: tuple[int, ...] = WIDTHS
    bits: int | None = None
    group_size: int = 128
    sensitivity_samples: int = 2
    sensitivity_seq_len: int = 64

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "widths", tuple(self.widths))
        if not self.widths or any(w not in WIDTHS for w in self.widths):
            raise ConfigError(f"widths must be a non-empty subset of {list(WIDTHS)}", "widths")
        if self.bits is not None:
            check_choice(self.bits, WIDTHS, "bits")
        check_choice(self.group_size, GROUP_SIZES, "group_size")
        check_range(self.sensitivity_samples, 1, 4096, "sensitivity_samples")
        check_range(self.sensitivity_seq_len, 2, 65536, "sensitivity_seq_len")
        if self.target_bits_per_weight is not None:
            check_range(self.target_bits_per_weight, 0.0, 32.0, "target_bits_per_weight")
        if self.max_weight_bytes is not None:
            check_range(self.max_weight_bytes, 0, 2**62, "max_weight_bytes")
        if self.max_ppl_increase_pct is not None:
            check_range(self.max_ppl_increase_pct, 0.0, 1e6, "max_ppl_increase_pct")
        if self.bits is None and all(getattr(self, f) is None for f in _BUDGET_FIELDS):
            raise ConfigError(
                "mixed needs a budget: target_bits_per_weight, max_weight_bytes "
                "or max_ppl_increase_pct",
                "target_bits_per_weight",
            )


def _float_bytes(linear: nn.Linear) -> int:
    """Bytes of a layer left in float, as served (bfloat16)."""
    bias = 0 if linear.bias is None else linear.bias.numel()
    return 2 * (linear.weight.numel() + bias)


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _build(linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
    """The layer as served at `bits` (float layers stay as they are)."""
    if bits == FLOAT_BITS:
        return linear
    if bits == 4:
        return Int4WeightOnlyLinear.from_float(linear, group_size)
    return Int8WeightOnlyLinear.from_float(linear)


class _ByteCosts:
    """Stored bytes of a layer at each width, built once per distinct shape.

    The byte counts are those of the very modules the final swap builds, so a
    plan the knapsack accepts is the size it says; building each width for
    every layer up front would hold every candidate in memory at once.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, bool, int, int], int] = {}

    def __call__(self, linear: nn.Linear, bits: int, group_size: int) -> int:
        if bits == FLOAT_BITS:
            return _float_bytes(linear)
        key = (linear.out_features, linear.in_features, linear.bias is not None, bits, group_size)
        if key not in self._known:
            self._known[key] = _module_bytes(_build(linear, bits, group_size))
        return self._known[key]


def _widths_for(target: LayerTarget) -> tuple[int, ...]:
    fixed = target.config.bits
    return (fixed,) if fixed is not None else target.config.widths


def _tied_head_bits(target: LayerTarget) -> int:
    """A tied head serves embedding rows too: int8 codes, or float when fixed so."""
    return FLOAT_BITS if target.config.bits == FLOAT_BITS else 8


def _choose(config: MixedConfig, allocator: Allocator) -> Plan:
    """The plan meeting every budget given, or ConfigError naming the closest one.

    Without any budget (every layer's width fixed by `bits`) the plan is the
    only one there is.
    """
    limits = []
    if config.target_bits_per_weight is not None:
        limits.append(math.floor(config.target_bits_per_weight * allocator.weights / 8))
    if config.max_weight_bytes is not None:
        limits.append(config.max_weight_bytes)
    max_bytes = min(limits) if limits else None
    field = "target_bits_per_weight" if config.target_bits_per_weight is not None else ""
    field = field or "max_weight_bytes"
    try:
        if max_bytes is None and config.max_ppl_increase_pct is None:
            return allocator.smallest()
        plan = allocator.best_within(max_bytes) if max_bytes is not None else None
        if config.max_ppl_increase_pct is not None:
            field = "max_ppl_increase_pct"
            plan = allocator.cheapest_with_loss(
                math.log1p(config.max_ppl_increase_pct / 100), max_bytes
            )
    except BudgetUnreachable as unreachable:
        closest = unreachable.closest
        raise ConfigError(
            f"budget cannot be met: {unreachable.reason}; closest plan: "
            f"{closest.bits_per_weight:.3f} bits per weight, {closest.bytes} bytes, estimated "
            f"perplexity increase {closest.ppl_increase_pct:.2f}%",
            field,
        ) from None
    assert plan is not None
    return plan


def _sensitivities(
    ctx: QuantContext, config: MixedConfig, measured: list[LayerTarget]
) -> tuple[dict[str, dict[int, float]], int]:
    """Measured KL of each layer with more than one width (progress per layer),
    and the number of tokens it was measured on."""
    if not measured:
        return {}, 0
    calibration = ctx.require_calibration()
    stride = max(1, len(calibration) // config.sensitivity_samples)
    batches = [
        b.reshape(-1, b.shape[-1])[:, : config.sensitivity_seq_len]
        for b in calibration[::stride][: config.sensitivity_samples]
    ]

    def weight_at(target: LayerTarget) -> Callable[[int], Tensor]:
        def build(bits: int) -> Tensor:
            """The dequantised RTN weight the int4/int8 kernel would compute with."""
            return rtn_weight(target.module.weight.detach().float(), bits, target.config.group_size)

        return build

    def progress(done: int, total: int) -> None:
        ctx.check_cancel()
        ctx.report_progress(done, total)

    scores = measured_sensitivities(
        ctx.model,
        batches,
        {t.name: weight_at(t) for t in measured},
        {t.name: [b for b in _widths_for(t) if b != FLOAT_BITS] for t in measured},
        progress,
    )
    return scores, sum(int(b.numel()) for b in batches)


@register_method("mixed", MixedConfig, calibrated=True)
def apply_mixed(model: nn.Module, config: MixedConfig, ctx: QuantContext) -> None:
    knapsack = [t for t in ctx.targets if t.name != ctx.tied_head]
    measured = [t for t in knapsack if len(_widths_for(t)) > 1]
    sensitivities, tokens = _sensitivities(ctx, config, measured)

    cost = _ByteCosts()
    options = {}
    for target in knapsack:
        scores = sensitivities.get(target.name, {})
        options[target.name] = [
            LayerOption(
                bits,
                cost(target.module, bits, target.config.group_size),
                scores.get(bits, 0.0),
            )
            for bits in _widths_for(target)
        ]
    weights = {t.name: t.module.weight.numel() for t in knapsack}
    plan = _choose(config, Allocator(options, weights))
    chosen = dict(plan.bits)
    by_name = {t.name: t for t in ctx.targets}
    if ctx.tied_head is not None and ctx.tied_head in by_name:
        chosen[ctx.tied_head] = _tied_head_bits(by_name[ctx.tied_head])

    for name, bits in chosen.items():
        ctx.check_cancel()
        target = by_name[name]
        info: dict[str, Any] = {"bits": bits}
        if name in sensitivities:
            info["sensitivity"] = {str(b): s for b, s in sensitivities[name].items()}
        ctx.replace(name, _build(target.module, bits, target.config.group_size), **info)

    ctx.extra["mixed"] = {
        "plan": chosen,
        "overrides": {name: {"bits": bits} for name, bits in chosen.items()},
        "sensitivity": {
            name: {str(b): s for b, s in per_width.items()}
            for name, per_width in sensitivities.items()
        },
        "sensitivity_tokens": tokens,
        "planned_bits_per_weight": plan.bits_per_weight,
        "planned_bytes": plan.bytes,
        "estimated_kl": plan.loss,
        "estimated_ppl_increase_pct": plan.ppl_increase_pct,
    }

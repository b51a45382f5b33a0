"""`mixed`: a bit width per layer (int4 / int8 / float) chosen to meet a budget.

Layers differ widely in how much their quantisation hurts (SmolLM2's early
MLP projections far more than most attention projections), so a uniform width
wastes bytes where they buy nothing. Each layer's sensitivity at each width is
estimated on calibration data (quantizers.methods.sensitivity), then a
knapsack (quantizers.methods.bit_allocation) picks the widths: least
estimated loss within a memory budget, or fewest bytes within a quality budget.

The chosen plan goes into the report (`extra["mixed"]`) with the overrides that
reproduce it: passing them back as this config's `overrides` fixes every
layer's width, and then no calibration data is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantizers.errors import ConfigError
from quantizers.methods.bit_allocation import Allocator, BudgetUnreachable, LayerOption, Plan
from quantizers.methods.column_grid import rtn_weight
from quantizers.methods.sensitivity import fisher_sensitivities
from quantizers.registry import (
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
    included, averaged over the targeted layers), max_weight_bytes (of those
    layers) and max_ppl_increase_pct (estimated from the sensitivities).

    widths: the widths a layer may take (16 = float, served in bfloat16).
    bits: fixes a layer's width; meant for per-layer overrides (the plan).
    group_size: int4 group size. sensitivity_samples: calibration sequences
    used to estimate sensitivities.
    """

    target_bits_per_weight: float | None = None
    max_weight_bytes: int | None = None
    max_ppl_increase_pct: float | None = None
    widths: tuple[int, ...] = WIDTHS
    bits: int | None = None
    group_size: int = 128
    sensitivity_samples: int = 8

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "widths", tuple(self.widths))
        if not self.widths or any(w not in WIDTHS for w in self.widths):
            raise ConfigError(f"widths must be a non-empty subset of {list(WIDTHS)}", "widths")
        if self.bits is not None:
            check_choice(self.bits, WIDTHS, "bits")
        check_choice(self.group_size, GROUP_SIZES, "group_size")
        check_range(self.sensitivity_samples, 1, 4096, "sensitivity_samples")
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


class _Candidates:
    """The quantised forms of one layer at each width it may take, built once."""

    def __init__(self, target: LayerTarget, widths: tuple[int, ...]) -> None:
        self.target = target
        linear = target.module
        group_size = target.config.group_size
        self.modules: dict[int, nn.Module] = {}
        self.deltas: dict[int, torch.Tensor] = {}
        self.bytes: dict[int, int] = {}
        for bits in widths:
            if bits == FLOAT_BITS:
                self.modules[bits] = linear
                self.bytes[bits] = _float_bytes(linear)
                continue
            module = (
                Int4WeightOnlyLinear.from_float(linear, group_size)
                if bits == 4
                else Int8WeightOnlyLinear.from_float(linear)
            )
            self.modules[bits] = module
            self.bytes[bits] = _module_bytes(module)
            weight = linear.weight.detach().float()
            self.deltas[bits] = rtn_weight(weight, bits, group_size) - weight


def _widths_for(target: LayerTarget) -> tuple[int, ...]:
    fixed = target.config.bits
    return (fixed,) if fixed is not None else target.config.widths


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


@register_method("mixed", MixedConfig)
def apply_mixed(model: nn.Module, config: MixedConfig, ctx: QuantContext) -> None:
    candidates = {t.name: _Candidates(t, _widths_for(t)) for t in ctx.targets}
    sensitivities: dict[str, dict[int, float]] = {}
    if any(len(c.modules) > 1 for c in candidates.values()):
        batches = ctx.require_calibration()
        deltas = {name: c.deltas for name, c in candidates.items() if c.deltas}
        sample = batches[: config.sensitivity_samples]
        sensitivities = fisher_sensitivities(model, sample, deltas)

    options = {
        name: [
            LayerOption(bits, c.bytes[bits], sensitivities.get(name, {}).get(bits, 0.0))
            for bits in c.modules
        ]
        for name, c in candidates.items()
    }
    weights = {name: c.target.module.weight.numel() for name, c in candidates.items()}
    plan = _choose(config, Allocator(options, weights))

    for name, bits in plan.bits.items():
        ctx.check_cancel()
        info: dict[str, Any] = {"bits": bits}
        if name in sensitivities:
            info["sensitivity"] = {str(b): s for b, s in sensitivities[name].items()}
        ctx.replace(name, candidates.pop(name).modules[bits], **info)

    ctx.extra["mixed"] = {
        "plan": plan.bits,
        "overrides": {name: {"bits": bits} for name, bits in plan.bits.items()},
        "sensitivity": {
            name: {str(b): s for b, s in per_width.items()}
            for name, per_width in sensitivities.items()
        },
        "planned_bits_per_weight": plan.bits_per_weight,
        "planned_bytes": plan.bytes,
        "estimated_kl": plan.loss,
        "estimated_ppl_increase_pct": plan.ppl_increase_pct,
    }

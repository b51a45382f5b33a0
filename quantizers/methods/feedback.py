"""`feedback`: refine any method's int4/int8 result by measuring its error and
adjusting its grids, for a bounded number of rounds.

Round 0 is the starting method's result (RTN int4 by default). Each round
measures every quantised layer's input-weighted output error and the model's
end-to-end KL divergence from the float model on calibration batches, then
moves each layer's per-group (int4) or per-channel (int8) scales and clipping
ranges one Lloyd step towards lower output error
(quantizers.methods.grid_refinement). Rounds stop when the KL stops falling;
the model keeps the round with the lowest KL, so the result is never worse
than its start on the calibration data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.calibration import collect_activation_stats
from quantizers.errors import ConfigError
from quantizers.methods.block_walk import compute_in_bf16, stack_batches
from quantizers.methods.grid_refinement import ChannelGrid, GroupGrid, padded_to
from quantizers.methods.sensitivity import measured_kl
from quantizers.registry import (
    HEAD_INCLUDED_SKIP,
    MethodConfig,
    QuantContext,
    check_range,
    get_method,
    register_method,
)
from quantizers.runtime.base import COMPUTE_DTYPE
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear

Grid = GroupGrid | ChannelGrid


@dataclass(frozen=True)
class FeedbackConfig(MethodConfig):
    """start: {"method": name, "config": {...}} — the result to refine. A start
    config without its own `skip` takes this config's, so by default the tied
    lm_head is int8 codes shared with the embedding, as in int4's rows.
    rounds: refinement rounds at most (0 measures the start only).
    kl_samples: calibration sequences the end-to-end KL is measured on.
    stat_samples: calibration sequences the input-channel energies come from.
    """

    skip: tuple[str, ...] = HEAD_INCLUDED_SKIP
    start: Mapping[str, Any] = field(
        default_factory=lambda: {"method": "int4", "config": {"group_size": 128}}
    )
    rounds: int = 4
    kl_samples: int = 4
    stat_samples: int = 16

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.start, Mapping) or not isinstance(self.start.get("method"), str):
            raise ConfigError('start must be {"method": name, "config": {...}}', "start")
        if set(self.start) - {"method", "config"}:
            raise ConfigError('start takes only "method" and "config"', "start")
        if self.start["method"] == "feedback":
            raise ConfigError("feedback cannot start from feedback", "start")
        try:
            get_method(self.start["method"]).make_config(self.start.get("config"))
        except ConfigError as exc:
            raise ConfigError(f"start: {exc.message}", "start") from None
        object.__setattr__(self, "start", dict(self.start))
        for name in ("rounds", "kl_samples", "stat_samples"):
            value = getattr(self, name)
            check_range(value, 0 if name == "rounds" else 1, 4096, name)
            if not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}", name)


@dataclass
class _Layer:
    """A refinable layer: its float weight (unpadded), input importance and current grid."""

    weight: Tensor
    importance: Tensor
    grid: Grid
    bias: Tensor | None
    in_features: int

    def module(self) -> nn.Module:
        if isinstance(self.grid, GroupGrid):
            return Int4WeightOnlyLinear.from_quantized(
                self.grid.codes,
                self.grid.scale,
                self.grid.zero,
                self.grid.group_size,
                self.bias,
                self.in_features,
            )
        return Int8WeightOnlyLinear.from_quantized(
            self.grid.codes, self.grid.scale, None, None, self.bias
        )

    def error(self) -> float:
        return self.grid.weighted_error(self.weight, self.importance)


def _grid_of(module: nn.Module) -> Grid | None:
    if isinstance(module, Int4WeightOnlyLinear):
        q, scale, zero = module.unpacked()
        return GroupGrid(q, scale, (8 - zero) * scale, module.group_size)
    if isinstance(module, Int8WeightOnlyLinear):
        return ChannelGrid(module.weight.clone(), module.scale.float())
    return None


def _start(model: nn.Module, config: FeedbackConfig, ctx: QuantContext) -> QuantContext:
    """Apply the starting method in place; its context lists what it quantised."""
    method = get_method(config.start["method"])
    start_config = method.make_config({"skip": config.skip, **(config.start.get("config") or {})})

    start_ctx = QuantContext(model, start_config, ctx.calibration, None, ctx.cancelled)
    method.apply(model, start_config, start_ctx)
    ctx.extra.update(start_ctx.extra)
    return start_ctx


def _sequence_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Logits of one calibration sequence (the vocabulary is large: one at a time)."""
    with compute_in_bf16():
        return model(input_ids=ids.reshape(1, -1), use_cache=False).logits


def _kl(model: nn.Module, sequences: list[Tensor], reference: list[Tensor]) -> float:
    """Mean KL over the sequences, each sequence's logits dropped once measured,
    so only the reference logits are held for all of them."""
    kls = [
        measured_kl(ref, _sequence_logits(model, ids))
        for ids, ref in zip(sequences, reference, strict=True)
    ]
    return sum(kls) / len(kls)


@register_method("feedback", FeedbackConfig, calibrated=True)
def apply_feedback(model: nn.Module, config: FeedbackConfig, ctx: QuantContext) -> None:
    batches = ctx.require_calibration()
    kl_batches = list(batches[: config.kl_samples])
    names = [t.name for t in ctx.targets]
    # References, not copies: the start swaps each float layer for a quantised
    # module and leaves its weight alone, so holding the weight keeps the float
    # model's own memory alive instead of allocating a second float copy.
    floats = {t.name: t.module.weight.detach().float() for t in ctx.targets}
    with torch.no_grad():
        stats = collect_activation_stats(
            model,
            stack_batches(batches[: config.stat_samples]),
            module_names=names,
            compute_dtype=COMPUTE_DTYPE,
        )
    reference = [_sequence_logits(model, ids) for ids in kl_batches]

    start_ctx = _start(model, config, ctx)
    layers: dict[str, _Layer] = {}
    for name in start_ctx.layers:
        module = model.get_submodule(name)
        grid = _grid_of(module)
        if grid is None or name not in floats or name not in stats:
            continue
        kp = grid.codes.shape[1]
        weight = floats.pop(name)
        layers[name] = _Layer(
            weight=weight,
            importance=padded_to(stats[name].mean_square.reshape(1, -1), kp)[0],
            grid=grid,
            bias=getattr(module, "bias", None),
            in_features=weight.shape[1],
        )
        del weight
    # Drop the other references: the float weights of layers the start
    # quantised into modules that are not refined are freed here.
    floats.clear()

    history = [
        {
            "round": 0,
            "kl": _kl(model, kl_batches, reference),
            "layer_error": sum(layer.error() for layer in layers.values()),
        }
    ]
    # The best round is kept as its installed modules (packed, half a byte per
    # weight), not as grids: a grid's unpacked codes take a byte per weight,
    # and the current round's grids are held besides.
    best = (history[0]["kl"], {name: model.get_submodule(name) for name in layers})
    _report_round(ctx, 0, config.rounds)
    for round_index in range(1, config.rounds + 1):
        ctx.check_cancel()
        for name, layer in layers.items():
            refined = layer.grid.refined(layer.weight, layer.importance)
            if refined.weighted_error(layer.weight, layer.importance) < layer.error():
                layer.grid = refined
                _install(model, name, layer.module())
        kl = _kl(model, kl_batches, reference)
        history.append(
            {
                "round": round_index,
                "kl": kl,
                "layer_error": sum(layer.error() for layer in layers.values()),
            }
        )
        _report_round(ctx, round_index, config.rounds)
        if kl >= best[0]:
            break
        best = (kl, {name: model.get_submodule(name) for name in layers})

    for name in start_ctx.layers:
        ctx.check_cancel()
        module = best[1][name] if name in best[1] else model.get_submodule(name)
        ctx.replace(name, module, **start_ctx.layers[name])
    ctx.extra["feedback"] = {
        "start": config.start,
        "rounds": history,
        "best_round": min(history, key=lambda h: h["kl"])["round"],
        "refined_layers": len(layers),
    }


def _report_round(ctx: QuantContext, done: int, rounds: int) -> None:
    """Progress in layers: measuring the start and each round are equal shares."""
    total = len(ctx.targets)
    ctx.report_progress((done + 1) * total // (rounds + 1), total)


def _install(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

"""`w8a8-dynamic` and `w8a8-static`: int8 weights and int8 activations.

Dynamic computes one activation scale per token at run time and needs no
calibration. Static fixes one (scale, zero point) per layer input from the
calibration batches: cheaper at run time, but LLM activations have outlier
channels and outlier tokens that stretch the range and cost resolution for
everything else — the baseline SmoothQuant improves on. The static range is
not simply the observed [min, max]: a shrunk range that clips the rare
outliers but resolves the bulk often gives a smaller output error, so each
layer's range is chosen from CLIP_GRID by its estimated output error on
sampled calibration rows. Each layer's clip ratio and estimated error go into
the report, so the layers that cannot take one static int8 grid (SmolLM2's
down_proj inputs, with 1000x "massive activation" tokens) are visible there.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from quantizers.calibration import ActivationStats, collect_activation_stats, subsample_batches
from quantizers.errors import ConfigError
from quantizers.registry import LayerTarget, MethodConfig, QuantContext, register_method
from quantizers.runtime.base import COMPUTE_DTYPE
from quantizers.runtime.w8a8 import W8A8Linear, quantize_static, static_activation_params

# Fractions of the observed [min, max] tried as the static range.
CLIP_GRID = (1.0, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03)
# Sampled input rows per layer input that score the candidate ranges.
RANGE_ROWS = 512
# Default cap on the calibration tokens run through the model (see calibration_tokens).
CALIBRATION_TOKENS = 4096
# w8a8-static's own default, chosen on the validation text (512-1024 best, 4096
# and more worse): more tokens see more of the rare outlier tokens that stretch
# a static range and cost resolution for everything else.
STATIC_CALIBRATION_TOKENS = 1024


def check_calibration_tokens(value: object) -> None:
    """calibration_tokens must be a positive integer (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"calibration_tokens must be a positive integer, got {value!r}", "calibration_tokens"
        )


@dataclass(frozen=True)
class W8A8DynamicConfig(MethodConfig):
    """No knobs beyond the layer selection shared by all methods."""


@dataclass(frozen=True)
class W8A8StaticConfig(MethodConfig):
    """calibration_tokens: at most this many calibration tokens are run (evenly
    spaced whole sequences). clip_search: choose each input's range from
    CLIP_GRID by estimated output error; False keeps the observed [min, max].
    Both defaults were chosen on the validation text, never on WikiText-2 test
    (docs/benchmarks.md, "Defaults chosen on the validation text")."""

    calibration_tokens: int = STATIC_CALIBRATION_TOKENS
    clip_search: bool = True

    def validate(self) -> None:
        super().validate()
        check_calibration_tokens(self.calibration_tokens)
        if not isinstance(self.clip_search, bool):
            raise ConfigError(f"clip_search must be true or false, got {self.clip_search!r}",
                              "clip_search")


def static_output_error(rows: Tensor, column_energy: Tensor, low: float, high: float) -> float:
    """Estimated relative output error of static int8 inputs on the range [low, high].

    The error of x @ W.T is approximated channel by channel: each input
    channel's squared error weighted by the squared norm of its weight column
    (the cross terms average out); exact matmuls per candidate would cost a
    forward pass per layer per candidate. Errors are summed over tokens, so the
    rare 1000x "massive activation" tokens weigh in by their energy: measured
    per token instead, the search clips them, and SmolLM2's perplexity on
    WikiText-2 goes from 1.5x to 4x float, because those tokens are the
    attention sinks the model relies on.
    """
    scale, zero = static_activation_params(low, high)
    error = (quantize_static(rows, scale, zero).float() - zero) * scale - rows
    signal = rows.square().sum(0) @ column_energy
    return float(error.square().sum(0) @ column_energy / signal.clamp_min(1e-12))


@dataclass(frozen=True)
class StaticRange:
    """A calibrated static input range, its CLIP_GRID ratio and estimated output error."""

    low: float
    high: float
    clip: float
    error: float

    @property
    def bounds(self) -> tuple[float, float]:
        return self.low, self.high

    def report(self) -> dict[str, float]:
        return {"input_clip": self.clip, "input_error": round(self.error, 5)}


def calibrated_range(
    stats: ActivationStats, weights: list[Tensor], factors: Tensor | None = None
) -> StaticRange:
    """The CLIP_GRID range with the lowest estimated output error.

    weights: the consumers of this input, as they will be quantised. factors:
    smoothing already divided into the inputs (SmoothQuant), applied to the
    observed statistics and rows here. Without sampled rows the observed range.
    """
    low, high = stats.min, stats.max
    rows = stats.rows.float() if stats.rows is not None else None
    if factors is not None:
        low, high = low / factors, high / factors
        rows = rows / factors if rows is not None else None
    low_f, high_f = float(low.min()), float(high.max())
    if rows is None:
        return StaticRange(low_f, high_f, 1.0, float("nan"))
    energy = sum(w.detach().float().square().sum(0) for w in weights)
    candidates = [
        StaticRange(
            low_f * r, high_f * r, r, static_output_error(rows, energy, low_f * r, high_f * r)
        )
        for r in CLIP_GRID
    ]
    return min(candidates, key=lambda item: item.error)


def calibrate(
    model: nn.Module,
    ctx: QuantContext,
    tokens: int,
    names: list[str],
    keep_rows: int = 0,
    rows_for: Collection[str] | None = None,
) -> dict[str, ActivationStats]:
    """Input statistics of the named linears from at most `tokens` calibration tokens.

    The forward runs in bfloat16, the dtype the quantised model computes in;
    keep_rows rows are sampled for the layers in rows_for (default: all).
    """
    batches = subsample_batches(ctx.require_calibration(), tokens)
    stats = collect_activation_stats(
        model, batches, names, keep_rows, rows_for, compute_dtype=COMPUTE_DTYPE
    )
    ctx.extra["calibration_tokens"] = sum(int(b.numel()) for b in batches)
    return stats


def static_ranges(
    ctx: QuantContext,
    stats: dict[str, ActivationStats],
    factors_of: Mapping[str, Tensor] | None = None,
) -> dict[str, StaticRange]:
    """The calibrated input range of every target, then the statistics are dropped.

    Linears that read the same tensor (q/k/v, gate/up) share its statistics
    and get one range, scored against all their weights: one search instead
    of three. Choosing all ranges before any layer is replaced lets the sampled
    rows go before the quantised layers are built, so the two never add up in
    memory. factors_of: the smoothing already folded into each target's input.
    """
    readers: dict[int, list[LayerTarget]] = {}
    for target in ctx.targets:
        readers.setdefault(id(stats[target.name]), []).append(target)
    ranges = {}
    for group in readers.values():
        first = group[0].name
        with ctx.layer_errors(first):
            chosen = calibrated_range(
                stats[first], [t.module.weight for t in group], (factors_of or {}).get(first)
            )
        ranges.update(dict.fromkeys((t.name for t in group), chosen))
    stats.clear()
    return ranges


@register_method("w8a8-dynamic", W8A8DynamicConfig)
def apply_w8a8_dynamic(model: nn.Module, config: W8A8DynamicConfig, ctx: QuantContext) -> None:
    def build(target: LayerTarget) -> nn.Module:
        return W8A8Linear.from_float(target.module)

    ctx.quantize_layers(build)


@register_method("w8a8-static", W8A8StaticConfig, calibrated=True)
def apply_w8a8_static(model: nn.Module, config: W8A8StaticConfig, ctx: QuantContext) -> None:
    rows = RANGE_ROWS if config.clip_search else 0
    stats = calibrate(model, ctx, config.calibration_tokens, [t.name for t in ctx.targets], rows)
    ranges = static_ranges(ctx, stats)

    def build(target: LayerTarget) -> nn.Module:
        return W8A8Linear.from_float(target.module, ranges[target.name].bounds)

    ctx.quantize_layers(build)
    for name, chosen in ranges.items():
        ctx.layers[name].update(chosen.report())

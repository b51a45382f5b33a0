"""W8A8 (dynamic, static) and SmoothQuant: real int8 x int8 matmuls against float."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from quantizers import ConfigError, quantize
from quantizers.calibration import ActivationStats
from quantizers.methods.smooth_groups import find_groups
from quantizers.methods.smoothquant import smooth, smoothing_factors
from quantizers.methods.w8a8 import calibrated_range, static_output_error
from quantizers.primitives import dequantize_per_channel, quantize_per_channel_symmetric
from quantizers.runtime import W8A8Linear
from quantizers.serialization import build_from_state, quantized_state

from .conftest import tiny_llama_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


def test_dynamic_matches_per_token_fake_quantisation() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 64)
    x = torch.randn(6, 96) * torch.linspace(0.1, 10, 6)[:, None]
    module = W8A8Linear.from_float(linear)
    q, scale = quantize_per_channel_symmetric(linear.weight)
    x_scale = x.abs().amax(1, keepdim=True) / 127
    x_q = torch.round(x / x_scale) * x_scale
    exact = x_q @ dequantize_per_channel(q, scale).t() + linear.bias
    assert relative_error(module(x), exact) < 0.01
    assert relative_error(module(x), linear(x)) < 0.03


def test_static_zero_point_is_applied() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.rand(5, 64) * 6 - 1  # in [-1, 5]: an asymmetric range
    module = W8A8Linear.from_float(linear, (-1.0, 5.0))
    assert int(module.input_zero) == 42 - 128  # 1 / (6 / 255) = 42.5 rounds half to even
    assert relative_error(module(x), linear(x)) < 0.03
    # the same codes read without the zero-point term are badly wrong
    codes_only = W8A8Linear.from_quantized(
        module.weight,
        module.weight_scale,
        input_scale=module.input_scale,
        input_zero=torch.tensor(0),
    )
    assert relative_error(codes_only(x), linear(x)) > 0.1


def test_static_clips_outside_the_calibrated_range() -> None:
    linear = nn.Linear(8, 4, bias=False)
    module = W8A8Linear.from_float(linear, (-1.0, 1.0))
    x = torch.full((1, 8), 5.0)
    assert relative_error(module(x), linear(torch.ones(1, 8))) < 0.05


def outlier_llama() -> LlamaForCausalLM:
    """A tiny Llama with a few large activation channels, as real LLMs have."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 30.0
            layer.post_attention_layernorm.weight[5] = 25.0
    return model


@pytest.fixture
def calibration() -> list[torch.Tensor]:
    return [
        torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]


def quantised_error(
    method: str, config: dict, calibration: list[torch.Tensor], tokens: torch.Tensor
) -> tuple[float, dict]:
    model = outlier_llama()
    with torch.no_grad():
        reference = model(tokens).logits
    report = quantize(model, method, config, calibration=calibration)
    with torch.no_grad():
        return relative_error(model(tokens).logits, reference), report.to_dict()


def test_smoothquant_beats_static_w8a8_on_outlier_activations(
    calibration: list[torch.Tensor], tiny_tokens: torch.Tensor
) -> None:
    static, static_report = quantised_error("w8a8-static", {}, calibration, tiny_tokens)
    smooth_static, report = quantised_error(
        "smoothquant", {"activations": "static"}, calibration, tiny_tokens
    )
    assert smooth_static < 0.75 * static
    alphas = report["extra"]["alpha"]
    assert len(alphas) == 6 and all(0.5 <= a <= 0.85 for a in alphas.values())
    assert {layer["activations"] for layer in report["layers"].values()} == {"static"}
    assert all(0 < layer["input_clip"] <= 1 for layer in static_report["layers"].values())
    observed, observed_report = quantised_error("w8a8-static", {"clip_search": False},
                                                calibration, tiny_tokens)
    assert {layer["input_clip"] for layer in observed_report["layers"].values()} == {1.0}
    assert static <= observed, "the searched ranges include the observed [min, max]"
    smooth_dynamic, report = quantised_error("smoothquant", {}, calibration, tiny_tokens)
    assert smooth_dynamic < 0.1 and smooth_dynamic < static
    assert {layer["activations"] for layer in report["layers"].values()} == {"dynamic"}


def test_fixed_alpha_and_dynamic_activations(
    calibration: list[torch.Tensor], tiny_tokens: torch.Tensor
) -> None:
    error, report = quantised_error(
        "smoothquant", {"alpha": 0.7, "activations": "dynamic"}, calibration, tiny_tokens
    )
    assert error < 0.1
    assert set(report["extra"]["alpha"].values()) == {0.7}
    assert {layer["activations"] for layer in report["layers"].values()} == {"dynamic"}
    assert report["config"]["activations"] == "dynamic"


def test_smoothing_alone_keeps_the_float_model_exact(calibration: list[torch.Tensor]) -> None:
    """With every layer skipped from quantisation the folded model equals the original."""
    model = outlier_llama()
    tokens = calibration[0]
    with torch.no_grad():
        reference = model(tokens).logits
    for group in find_groups(model):
        weights = [model.get_submodule(c).weight for c in group.consumers]
        factors = torch.rand(weights[0].shape[1]) + 0.5
        assert smoothing_factors(factors, weights, 0.5).shape == factors.shape
        smooth(model, group, factors)
    with torch.no_grad():
        assert relative_error(model(tokens).logits, reference) < 1e-4


def test_dynamic_w8a8_needs_no_calibration(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor
) -> None:
    with torch.no_grad():
        reference = tiny_llama(tiny_tokens).logits
    quantize(tiny_llama, "w8a8-dynamic")
    with torch.no_grad():
        assert relative_error(tiny_llama(tiny_tokens).logits, reference) < 0.05


@pytest.mark.parametrize("method", ["w8a8-static", "smoothquant"])
def test_calibrated_methods_require_calibration(tiny_llama: nn.Module, method: str) -> None:
    with pytest.raises(ConfigError) as info:
        quantize(tiny_llama, method)
    assert info.value.param == "calibration"


@pytest.mark.parametrize(
    ("method", "config", "param"),
    [
        ("smoothquant", {"activations": "per-channel"}, "activations"),
        ("smoothquant", {"calibration_tokens": 0}, "calibration_tokens"),
        ("w8a8-static", {"calibration_tokens": 1.5}, "calibration_tokens"),
        ("w8a8-static", {"calibration_tokens": True}, "calibration_tokens"),
        ("w8a8-static", {"clip_search": "yes"}, "clip_search"),
    ],
)
def test_invalid_calibrated_configs_name_the_field(
    tiny_llama: nn.Module, method: str, config: dict, param: str
) -> None:
    with pytest.raises(ConfigError) as info:
        quantize(tiny_llama, method, config, calibration=[torch.ones(1, 8).long()])
    assert info.value.param == param


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "high", True])
def test_alpha_outside_the_unit_interval_names_alpha(tiny_llama: nn.Module, alpha: object) -> None:
    with pytest.raises(ConfigError) as info:
        quantize(tiny_llama, "smoothquant", {"alpha": alpha}, calibration=[torch.ones(1, 8).long()])
    assert info.value.param == "alpha"


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_smoothquant_round_trip_is_identical(
    calibration: list[torch.Tensor], tiny_tokens: torch.Tensor, activations: str
) -> None:
    """The folded norm weights travel with the artifact, as the int8 codes do."""
    model = outlier_llama()
    config = {"alpha": 0.6, "activations": activations}
    quantize(model, "smoothquant", config, calibration=calibration)
    tensors, plan = quantized_state(model)
    assert "model.layers.0.self_attn.q_proj.weight_row_sum" not in tensors
    rebuilt = build_from_state(model.config, tensors, plan)
    with torch.no_grad():
        assert torch.equal(rebuilt(tiny_tokens).logits, model(tiny_tokens).logits)


@needs_cuda
def test_cuda_int_mm_matches_cpu() -> None:
    linear = nn.Linear(576, 192)
    x = torch.randn(3, 576)
    module = W8A8Linear.from_float(linear)
    assert relative_error(module.to("cuda")(x.cuda()).cpu(), module.cpu()(x)) < 0.01


@pytest.mark.parametrize("input_range", [None, (-2.0, 3.0)])
def test_the_matmul_runs_on_int_mm(input_range: tuple[float, float] | None) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    module = W8A8Linear.from_float(linear, input_range)
    x = torch.rand(24, 128) * 4 - 1.5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = module(x)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_int_mm" in ops
    assert not ops & {"aten::linear", "aten::addmm", "aten::mm"}
    assert relative_error(out, linear(x)) < 0.02


def test_calibrated_static_range_beats_the_observed_max() -> None:
    """An outlier channel that feeds small weights stretches [min, max] for
    nothing: the chosen range clips it and resolves the other channels, for a
    smaller real int8 output error on fresh rows."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight[:, 5] *= 0.01

    def activations(rows: int) -> torch.Tensor:
        x = torch.randn(rows, 64, generator=generator)
        x[:, 5] *= 20.0
        return x

    observed = activations(512)
    stats = ActivationStats.first(observed)
    stats.rows = observed
    chosen = calibrated_range(stats, [linear.weight])
    low, high = float(stats.min.min()), float(stats.max.max())
    assert chosen.clip < 1.0
    assert chosen.error < static_output_error(
        observed, linear.weight.detach().square().sum(0), low, high
    )
    fresh = activations(256)
    plain = W8A8Linear.from_float(linear, (low, high))
    tuned = W8A8Linear.from_float(linear, chosen.bounds)
    reference = linear(fresh)
    assert relative_error(tuned(fresh), reference) < 0.5 * relative_error(plain(fresh), reference)


def test_layers_reading_one_input_share_one_static_grid(
    calibration: list[torch.Tensor],
) -> None:
    model = outlier_llama()
    report = quantize(model, "w8a8-static", {}, calibration=calibration)
    attn = model.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj):
        assert torch.equal(proj.input_scale, attn.q_proj.input_scale)
        assert torch.equal(proj.input_zero, attn.q_proj.input_zero)
    assert not torch.equal(attn.o_proj.input_scale, attn.q_proj.input_scale)
    assert report.extra["calibration_tokens"] == sum(b.numel() for b in calibration)

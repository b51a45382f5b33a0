"""GPTQ: error feedback must beat round-to-nearest on the error it minimises,
and the result must run on the same int4/int8 kernels as RTN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from quantizers.errors import ConfigError, QuantizationCancelled
from quantizers.methods.column_grid import int_grid
from quantizers.methods.gptq_solver import gptq_quantize
from quantizers.methods.hessian import HessianAccumulator, output_error
from quantizers.primitives import (
    dequantize_per_channel,
    dequantize_per_group,
    pad_to_multiple,
    quantize_per_channel_symmetric,
    quantize_per_group_asymmetric,
)
from quantizers.registry import quantize
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear

from .conftest import tiny_llama_config


def correlated_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Activations with correlated channels of very different energy, like an LLM's."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5
    energy = torch.linspace(0.1, 3.0, k)
    return (torch.randn(tokens, k, generator=gen) @ mix) * energy


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian()


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gptq_has_lower_output_error_than_rtn(act_order: bool) -> None:
    k = 96
    weight = torch.randn(64, k, generator=torch.Generator().manual_seed(0)) * 0.05
    hessian = hessian_of(correlated_inputs(2048, k, seed=1))
    solution = gptq_quantize(weight, hessian, int_grid(4, 64), act_order=act_order)

    q, scale, zero = quantize_per_group_asymmetric(pad_to_multiple(weight, 64, 1), 4, 64)
    rtn = dequantize_per_group(q, scale, zero, 64)[:, :k]
    gptq_error = output_error(solution.weight[:, :k] - weight, hessian)
    assert gptq_error < 0.8 * output_error(rtn - weight, hessian)
    # The codes and grid are the primitives' own: dequantising them gives the weight.
    assert solution.codes.shape == (64, 128) and solution.scale.shape == (64, 2)
    assert solution.zero is not None
    again = dequantize_per_group(solution.codes, solution.scale, solution.zero, 64)
    torch.testing.assert_close(again, solution.weight, atol=2e-3, rtol=0)
    assert int(solution.codes.min()) >= 0 and int(solution.codes.max()) <= 15


def test_int8_gptq_has_lower_output_error_than_rtn() -> None:
    k = 80
    weight = torch.randn(48, k, generator=torch.Generator().manual_seed(2)) * 0.05
    hessian = hessian_of(correlated_inputs(1024, k, seed=3))
    solution = gptq_quantize(weight, hessian, int_grid(8, None))
    rtn = dequantize_per_channel(*quantize_per_channel_symmetric(weight, 8))
    assert output_error(solution.weight - weight, hessian) < output_error(rtn - weight, hessian)
    assert solution.scale.shape == (48, 1) and solution.zero is None


def test_dead_input_channels_are_zeroed_not_nan() -> None:
    x = correlated_inputs(512, 64, seed=4)
    x[:, 5] = 0.0
    weight = torch.randn(32, 64) * 0.05
    solution = gptq_quantize(weight, hessian_of(x), int_grid(4, 32))
    assert torch.isfinite(solution.weight).all()
    # A channel that never sees input is stored as exact zero: its code is the zero point.
    assert solution.zero is not None
    assert torch.equal(solution.codes[:, 5].float(), solution.zero[:, 0])


def calibration(count: int, length: int, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, length), generator=gen) for _ in range(count)]


def layer_inputs(model: LlamaForCausalLM, name: str, ids: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().float())
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured[0].reshape(-1, captured[0].shape[-1])


def fresh_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def test_gptq_model_runs_on_int4_kernels_and_beats_rtn_per_layer() -> None:
    batches = calibration(16, 32)
    float_model = fresh_model()
    name = "model.layers.0.mlp.down_proj"
    float_layer: nn.Linear = float_model.get_submodule(name)
    # The inputs the layer's Hessian was built from: GPTQ's error is lower on them.
    x = layer_inputs(float_model, name, torch.cat(batches)).to(torch.bfloat16)
    with torch.no_grad():
        reference = float_layer(x.float())

    model = fresh_model()
    seen: list[tuple[int, int]] = []
    report = quantize(
        model,
        "gptq",
        {"group_size": 32},
        calibration=batches,
        progress=lambda done, total: seen.append((done, total)),
    )
    linears = [n for n, m in float_model.named_modules() if type(m) is nn.Linear]
    assert sorted(report.layers) == sorted(linears)
    # Progress moves layer by layer while the blocks are solved, not at the end.
    assert seen == [(i + 1, len(linears)) for i in range(len(linears))]
    blocks = [n for n in linears if n != "lm_head"]
    assert all(isinstance(model.get_submodule(n), Int4WeightOnlyLinear) for n in blocks)
    # The tied head is int8 RTN sharing its codes with the embedding, as int4 stores it.
    assert isinstance(model.get_submodule("lm_head"), Int8WeightOnlyLinear)
    assert report.layers["lm_head"]["tied_embedding"] is True
    assert "output_error" not in report.layers["lm_head"]

    rtn = Int4WeightOnlyLinear.from_float(float_layer, 32)
    with torch.no_grad():
        gptq_error = (model.get_submodule(name)(x).float() - reference).pow(2).mean()
        rtn_error = (rtn(x).float() - reference).pow(2).mean()
    assert gptq_error < rtn_error
    extra = report.extra["gptq"]
    assert extra["output_error"] < extra["rtn_output_error"]
    assert extra["calibration_tokens"] == 16 * 32


def test_gptq_logits_closer_to_float_than_rtn(tiny_tokens: torch.Tensor) -> None:
    float_model = fresh_model()
    with torch.no_grad():
        reference = float_model(tiny_tokens).logits.float()
    errors = {}
    for method in ("int4", "gptq"):
        model = fresh_model()
        quantize(model, method, {"group_size": 32}, calibration=calibration(32, 32))
        with torch.no_grad():
            errors[method] = (model(tiny_tokens).logits.float() - reference).pow(2).mean()
    assert errors["gptq"] < errors["int4"]


def test_int8_gptq_builds_int8_kernel_modules() -> None:
    model = fresh_model()
    report = quantize(model, "gptq", {"bits": 8}, calibration=calibration(8, 32))
    assert {layer["kind"] for layer in report.layers.values()} == {"Int8WeightOnlyLinear"}
    assert isinstance(model.get_submodule("model.layers.1.mlp.up_proj"), Int8WeightOnlyLinear)


def test_untied_lm_head_is_solved_by_gptq_after_the_blocks() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    report = quantize(model, "gptq", {"group_size": 32}, calibration=calibration(8, 32))
    assert report.layers["lm_head"]["kind"] == "Int4WeightOnlyLinear"
    assert report.layers["lm_head"]["output_error"] <= report.layers["lm_head"]["rtn_output_error"]


def test_head_left_in_float_when_the_skip_list_names_it() -> None:
    model = fresh_model()
    skip = ["*embed_tokens*", "*norm*", "lm_head"]
    report = quantize(model, "gptq", {"skip": skip}, calibration=calibration(8, 32))
    assert "lm_head" not in report.layers
    assert type(model.get_submodule("lm_head")) is nn.Linear


def test_too_few_calibration_tokens_names_the_minimum() -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(fresh_model(), "gptq", calibration=calibration(2, 32))
    assert caught.value.param == "calibration"
    # intermediate_size 192 is the widest input of the tiny model.
    assert "192" in caught.value.message and "64" in caught.value.message


def test_gptq_needs_calibration() -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(fresh_model(), "gptq")
    assert caught.value.param == "calibration"


@pytest.mark.parametrize(
    ("config", "param"),
    [({"bits": 3}, "bits"), ({"group_size": 48}, "group_size"), ({"damp": 2.0}, "damp")],
)
def test_invalid_config_names_the_field(config: dict[str, object], param: str) -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(fresh_model(), "gptq", config, calibration=calibration(8, 32))
    assert caught.value.param == param


def test_cancellation_stops_between_layers() -> None:
    calls = {"n": 0}

    def cancel_after_three_layers() -> bool:
        return calls["n"] >= 3

    def progress(done: int, _total: int) -> None:
        calls["n"] = done

    model = fresh_model()
    with pytest.raises(QuantizationCancelled):
        quantize(
            model,
            "gptq",
            calibration=calibration(8, 32),
            progress=progress,
            should_cancel=cancel_after_three_layers,
        )
    assert calls["n"] < 15

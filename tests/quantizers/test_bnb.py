"""bnb-int8 / bnb-nf4 through bitsandbytes; skipped with the reason where it cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantizers import ConfigError, MethodUnavailableError, quantize
from quantizers.methods.bnb import BnbInt8Config, BnbNF4Config, unavailable_reason
from quantizers.runtime import BnbInt8Linear, BnbNF4Linear
from quantizers.serialization import build_from_state, quantized_state


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="module")
def bnb_ready() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize(
    ("cls", "data", "param"),
    [
        (BnbInt8Config, {"threshold": -1.0}, "threshold"),
        (BnbNF4Config, {"blocksize": 100}, "blocksize"),
        (BnbNF4Config, {"double_quant": "yes"}, "double_quant"),
    ],
)
def test_invalid_configs_name_the_field(cls: type, data: dict, param: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls.from_dict(data)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("method", "kind", "bound"),
    [("bnb-int8", BnbInt8Linear, 0.05), ("bnb-nf4", BnbNF4Linear, 0.25)],
)
def test_model_logits_track_float_and_round_trip(
    bnb_ready: None, tiny_llama: nn.Module, tiny_tokens: torch.Tensor,
    method: str, kind: type, bound: float,
) -> None:
    with torch.no_grad():
        reference = tiny_llama(tiny_tokens).logits
    report = quantize(tiny_llama, method)
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, kind)
    with torch.no_grad():
        out = tiny_llama(tiny_tokens).logits
    assert relative_error(out, reference) < bound
    assert report.weight_bytes_after < report.weight_bytes_before / 2
    tensors, plan = quantized_state(tiny_llama)
    rebuilt = build_from_state(tiny_llama.config, tensors, plan)
    with torch.no_grad():
        assert torch.equal(rebuilt(tiny_tokens).logits, out)


def test_outlier_threshold_keeps_large_activation_columns_exact(bnb_ready: None) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64) * 0.1
    x[:, 7] = 40.0  # one outlier column, as in LLM activations
    plain = BnbInt8Linear.from_float(linear, threshold=0.0).eval()
    decomposed = BnbInt8Linear.from_float(linear, threshold=6.0).eval()
    reference = linear(x).detach()
    assert relative_error(decomposed(x), reference) < 0.5 * relative_error(plain(x), reference)


def test_unavailable_bitsandbytes_is_reported_at_request_time(tiny_llama: nn.Module) -> None:
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("bitsandbytes runs here; the unavailable path cannot be exercised")
    with pytest.raises(MethodUnavailableError) as info:
        quantize(tiny_llama, "bnb-nf4")
    assert info.value.param == "method" and reason in info.value.message


@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_pads_inputs_that_blocks_do_not_divide(bnb_ready: None, blocksize: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    module = BnbNF4Linear.from_float(linear, blocksize)
    x = torch.randn(8, 96)
    assert module.describe()["padded_in"] == 128
    # NF4 on Gaussian weights: ~9% relative error; straddling blocks gave ~25%
    assert relative_error(module(x).detach(), linear(x).detach()) < 0.13

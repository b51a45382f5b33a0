"""Frozen low-bit linears pass gradients to their input (LoRA training on a
quantised base): the gradient is that of the weight the kernel computes with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from quantizers.runtime.w8a8 import W8A8Linear


def _modules(linear: nn.Linear) -> dict[str, nn.Module]:
    return {
        "int4-g128-tail": Int4WeightOnlyLinear.from_float(linear, 128),  # 576 = 4 x 128 + 64
        "int4-g64": Int4WeightOnlyLinear.from_float(linear, 64),
        "int8": Int8WeightOnlyLinear.from_float(linear),
        "w8a8": W8A8Linear.from_float(linear),
    }


@pytest.mark.parametrize("kind", ["int4-g128-tail", "int4-g64", "int8", "w8a8"])
def test_input_gradient_is_that_of_the_dequantised_weight(kind: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(576, 200)
    module = _modules(linear)[kind]
    weight = module.dequantized_weight()
    x = torch.randn(6, 576, requires_grad=True)
    with torch.no_grad():
        served = module(x)
    # The dequantised weight is the kernel's: its product is the kernel's output
    # up to bf16 activation rounding, far closer than the float weight's.
    reference = x.detach() @ weight.T + module.bias.float()
    assert (served - reference).abs().max() < 0.3 * (linear(x) - reference).abs().max() + 0.03
    upstream = torch.randn(6, 200)
    out = module(x)  # on the dequantised weight in bf16: the kernel's numbers, re-accumulated
    assert (out.detach() - served).abs().max() <= 0.02 * served.abs().max()
    out.backward(upstream)
    expected = upstream.bfloat16().float() @ weight.bfloat16().float()
    torch.testing.assert_close(x.grad, expected, atol=0.05, rtol=0.02)
    assert not any(t.requires_grad for t in module.parameters())

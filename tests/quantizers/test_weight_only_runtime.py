"""Int8 / int4 weight-only modules: real kernel matmuls against float results."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantizers.packing import kernel_scales_and_zeros, pack_int4, pack_nibbles, unpack_int4
from quantizers.primitives import (
    dequantize_per_channel,
    dequantize_per_group,
    pad_to_multiple,
    quantize_per_channel_symmetric,
    quantize_per_group_asymmetric,
)
from quantizers.runtime import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from quantizers.runtime.int8 import dequantized_matmul
from quantizers.runtime.w8a8 import W8A8Linear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


def make_linear(k: int, n: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(k * 7 + n)
    linear = nn.Linear(k, n, bias=bias)
    # a few large columns, like real LLM weights, so a wrong scale shows
    with torch.no_grad():
        linear.weight[:, :3] *= 8
    return linear


@pytest.mark.parametrize(("k", "n"), [(96, 192), (576, 192), (64, 40)])
def test_int8_matches_dequantised_and_float(k: int, n: int) -> None:
    linear = make_linear(k, n)
    module = Int8WeightOnlyLinear.from_float(linear)
    x = torch.randn(3, 5, k)
    out = module(x)
    assert out.shape == (3, 5, n) and out.dtype == torch.float32
    q, scale = quantize_per_channel_symmetric(linear.weight)
    exact = x @ dequantize_per_channel(q, scale).t() + linear.bias
    # bf16 activations and scales: ~0.5% relative; a wrong scale or code is >> 1%
    assert relative_error(out, exact) < 0.01
    # the 8x columns widen each row's range; int8 + bf16 still stay within 3%
    assert relative_error(out, linear(x)) < 0.03
    assert torch.equal(module.weight, q)


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_weights_read_unaligned_are_realigned_for_the_kernels(rows: int) -> None:
    """Tensors inside a safetensors file are only 8-byte aligned; the int8
    kernel crashed on such a weight with several rows, so modules copy them
    (W8A8 too, whose `_int_mm` reads its weight the same way)."""
    linear = make_linear(64, 64, bias=False)
    q, scale = quantize_per_channel_symmetric(linear.weight)
    int4 = Int4WeightOnlyLinear.from_float(linear, 32)

    def unaligned(tensor: torch.Tensor) -> torch.Tensor:
        # a fresh allocation is 64-byte aligned, so 8 bytes in is not
        buffer = torch.empty(tensor.numel() + 8, dtype=tensor.dtype)[8:]
        copy = buffer.view_as(tensor).copy_(tensor)
        assert copy.data_ptr() % 64 == 8
        return copy

    module = Int8WeightOnlyLinear(unaligned(q), scale, None)
    embedding = module.as_embedding()
    int4_unaligned = Int4WeightOnlyLinear(
        unaligned(int4.packed), int4.scales_and_zeros, 32, 64, 64, None
    )
    w8a8 = W8A8Linear(unaligned(q), scale, None)
    for tensor in (module.weight, module.scale, embedding.weight, int4_unaligned.packed,
                   w8a8.weight):
        assert tensor.data_ptr() % 64 == 0
    x = torch.randn(rows, 64)
    assert torch.equal(module(x), Int8WeightOnlyLinear(q, scale, None)(x))
    assert torch.equal(int4_unaligned(x), int4(x))
    assert torch.equal(w8a8(x), W8A8Linear(q, scale, None)(x))


@pytest.mark.parametrize(("rows", "n"), [(1, 4100), (256, 4100), (300, 96)])
def test_int8_kernel_and_chunked_dequant_paths_agree(rows: int, n: int) -> None:
    """Few rows take the int8 kernel, many the chunked cast; both match float."""
    linear = make_linear(64, n)
    module = Int8WeightOnlyLinear.from_float(linear)
    x = torch.randn(rows, 64)
    q, scale = quantize_per_channel_symmetric(linear.weight)
    exact = x @ dequantize_per_channel(q, scale).t() + linear.bias
    assert relative_error(module(x), exact) < 0.01
    x16 = x.to(torch.bfloat16)
    kernel = torch.ops.aten._weight_int8pack_mm(x16, module.weight, module.scale)
    chunked = dequantized_matmul(x16, module.weight, module.scale)
    assert relative_error(chunked, kernel) < 0.01


def test_int8_returns_the_callers_dtype_and_handles_no_bias() -> None:
    linear = make_linear(96, 48, bias=False)
    module = Int8WeightOnlyLinear.from_float(linear)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    out = module(x)
    assert out.dtype == torch.bfloat16 and module.bias is None
    assert relative_error(out, linear(x.float())) < 0.03


def test_int8_from_quantized_rejects_group_parameters() -> None:
    q, scale = quantize_per_channel_symmetric(torch.randn(8, 32))
    with pytest.raises(ValueError, match="per channel"):
        Int8WeightOnlyLinear.from_quantized(q, scale, torch.zeros(8), None)
    with pytest.raises(ValueError, match="int8 codes"):
        Int8WeightOnlyLinear.from_quantized(q.float(), scale)


@pytest.mark.parametrize(
    ("k", "n", "group_size"),
    [(96, 192, 32), (96, 192, 64), (576, 192, 128), (128, 40, 128), (256, 48, 64)],
)
def test_int4_matches_dequantised_and_float(k: int, n: int, group_size: int) -> None:
    linear = make_linear(k, n)
    module = Int4WeightOnlyLinear.from_float(linear, group_size)
    x = torch.randn(7, k)
    out = module(x)
    assert out.shape == (7, n)
    padded = pad_to_multiple(linear.weight.detach(), group_size, dim=1)
    q, scale, zero = quantize_per_group_asymmetric(padded, 4, group_size, integer_zero=False)
    exact = x @ dequantize_per_group(q, scale, zero, group_size)[:, :k].t() + linear.bias
    assert relative_error(out, exact) < 0.01
    # 4-bit RTN on Gaussian weights costs roughly 10% relative error, not more
    assert relative_error(out, linear(x)) < 0.2


def test_int4_packing_round_trips_through_the_kernel() -> None:
    linear = make_linear(96, 40)
    module = Int4WeightOnlyLinear.from_float(linear, 64)
    q, scale, zero = module.unpacked()
    expected_q, expected_scale, expected_zero = quantize_per_group_asymmetric(
        pad_to_multiple(linear.weight.detach(), 64, dim=1), 4, 64, integer_zero=False
    )
    assert torch.equal(q, expected_q)
    assert torch.allclose(scale, expected_scale, rtol=0.01)
    # the kernel stores (8 - zero) * scale in bf16, so the zero comes back to ~0.1
    assert torch.allclose(zero, expected_zero, atol=0.1)
    # 96 = one whole group of 64 + a partial group stored as one kernel group of 32
    assert (module.main_in, module.tail_in, module.padded_in) == (64, 32, 96)
    assert module.padded_out == 48


def test_int4_partial_group_stores_no_padding_columns() -> None:
    """576 inputs in groups of 128: 4 whole groups and a 64-wide one, stored as
    exactly 576 columns of nibbles (zero-padding to 640 would add 11%)."""
    linear = make_linear(576, 192, bias=False)
    module = Int4WeightOnlyLinear.from_float(linear, 128)
    code_bytes = sum(
        t.numel() * t.element_size() for t in (module.packed, module.tail_packed)
    )
    assert code_bytes == 192 * 576 // 2
    assert module.scales_and_zeros.shape == (4, 192, 2)
    assert module.tail_scales_and_zeros.shape == (1, 192, 2)
    # same numbers as one kernel over the zero-padded layer (old layout), up to
    # the bf16 rounding of adding the two partial products
    padded = pad_to_multiple(linear.weight.detach(), 128, dim=1)
    q, scale, zero = quantize_per_group_asymmetric(padded, 4, 128, integer_zero=False)
    single = Int4WeightOnlyLinear(
        pack_int4(q, torch.device("cpu")),
        kernel_scales_and_zeros(scale, zero, torch.bfloat16),
        128, 576, 192, None,
    )
    assert single.padded_in == 640 and single.tail_packed is None
    x = torch.randn(9, 576)
    assert relative_error(module(x), single(x)) < 0.01
    exact = x @ dequantize_per_group(q, scale, zero, 128)[:, :576].t()
    assert relative_error(module(x), exact) < 0.01


def test_int4_from_quantized_with_padding_equals_from_float() -> None:
    linear = make_linear(96, 64)
    padded = pad_to_multiple(linear.weight.detach(), 128, dim=1)
    q, scale, zero = quantize_per_group_asymmetric(padded, 4, 128, integer_zero=False)
    built = Int4WeightOnlyLinear.from_quantized(q, scale, zero, 128, linear.bias, in_features=96)
    x = torch.randn(2, 96)
    assert torch.equal(built(x), Int4WeightOnlyLinear.from_float(linear, 128)(x))


def test_int4_from_quantized_checks_shapes() -> None:
    q, scale, zero = quantize_per_group_asymmetric(torch.randn(16, 128), 4, 64)
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnlyLinear.from_quantized(q, scale, zero, 32)
    with pytest.raises(ValueError, match="zero point"):
        Int4WeightOnlyLinear.from_quantized(q, scale, None, 64)


def test_nibble_packing_order() -> None:
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_nibbles(q).tolist() == [[0x12, 0xF0]]


def test_unpack_recovers_codes_of_a_cpu_packed_weight() -> None:
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
    assert torch.equal(unpack_int4(packed, 32, 64, 32), q)


@needs_cuda
def test_int4_moved_to_cuda_matches_cpu_and_moves_back() -> None:
    linear = make_linear(576, 192)
    module = Int4WeightOnlyLinear.from_float(linear, 128)
    x = torch.randn(5, 576)
    expected = module(x)
    gpu = copy.deepcopy(module).to("cuda")
    assert gpu.layout == "cuda"
    assert relative_error(gpu(x.cuda()).cpu(), expected) < 0.01
    saved = gpu.state_tensors()  # artifacts keep the CPU layout
    for name, tensor in module.state_tensors().items():
        assert torch.equal(saved[name].cpu(), tensor), name
    back = gpu.cpu()
    assert back.layout == "cpu"
    assert torch.equal(back(x), expected)


@needs_cuda
def test_int8_on_cuda_matches_cpu() -> None:
    linear = make_linear(576, 192)
    module = Int8WeightOnlyLinear.from_float(linear)
    x = torch.randn(5, 576)
    assert relative_error(module.to("cuda")(x.cuda()).cpu(), module.cpu()(x)) < 0.01

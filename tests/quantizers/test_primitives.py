"""Quantise/dequantise primitives: grids, error bounds, padding, bad input."""

from __future__ import annotations

import pytest
import torch

from quantizers.errors import ConfigError
from quantizers.primitives import (
    ROW_CHUNK,
    asymmetric_params,
    dequantize_per_channel,
    dequantize_per_group,
    pad_to_multiple,
    quantize_per_channel_symmetric,
    quantize_per_group_asymmetric,
    quantize_per_token_symmetric,
    quantize_to_grid,
)


def test_per_channel_symmetric_error_is_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.linspace(0.1, 5.0, 48)[:, None]
    q, scale = quantize_per_channel_symmetric(w, bits=8)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) == 127
    error = (dequantize_per_channel(q, scale) - w).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-6).all())
    # each row's largest magnitude maps exactly onto the grid edge
    assert torch.allclose(scale, w.abs().amax(1) / 127)


def test_row_chunks_give_the_same_codes_as_one_pass() -> None:
    """Rows are rounded ROW_CHUNK at a time (no full float copy of a vocabulary
    matrix); rows on both sides of a chunk boundary match a one-pass rounding."""
    torch.manual_seed(3)
    rows = ROW_CHUNK + 37
    w = torch.randn(rows, 64) * torch.linspace(0.1, 3.0, rows)[:, None]
    q, scale = quantize_per_channel_symmetric(w)
    assert torch.equal(q, torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
    q4, scale4, zero4 = quantize_per_group_asymmetric(w, 4, 32)
    one_pass = quantize_to_grid(w.reshape(rows, 2, 32), scale4[..., None], zero4[..., None], 4)
    assert torch.equal(q4, one_pass.reshape(rows, 64).to(torch.uint8))


def test_per_channel_symmetric_bits_limit_the_grid() -> None:
    q, _ = quantize_per_channel_symmetric(torch.randn(8, 32), bits=4)
    assert int(q.max()) <= 7 and int(q.min()) >= -7


def test_zero_rows_do_not_divide_by_zero() -> None:
    w = torch.zeros(4, 64)
    q, scale = quantize_per_channel_symmetric(w)
    assert bool(torch.isfinite(scale).all()) and int(q.abs().max()) == 0
    q4, s4, z4 = quantize_per_group_asymmetric(w, 4, 32)
    assert torch.equal(dequantize_per_group(q4, s4, z4, 32), w)


def test_per_group_asymmetric_shapes_range_and_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 256) + 0.5
    q, scale, zero = quantize_per_group_asymmetric(w, bits=4, group_size=64)
    assert q.dtype == torch.uint8 and q.shape == (32, 256)
    assert scale.shape == zero.shape == (32, 4)
    assert int(q.max()) <= 15
    assert torch.equal(zero, zero.round()) and float(zero.min()) >= 0 and float(zero.max()) <= 15
    error = (dequantize_per_group(q, scale, zero, 64) - w).abs().reshape(32, 4, 64)
    assert bool((error <= scale[..., None] / 2 + 1e-5).all())


def test_per_group_uses_each_groups_own_range() -> None:
    w = torch.cat([torch.full((1, 32), 0.01), torch.full((1, 32), 100.0)], dim=1)
    w[0, 0] = -0.01
    q, scale, zero = quantize_per_group_asymmetric(w, 4, 32)
    assert float(scale[0, 0]) < 0.01 < float(scale[0, 1])
    assert torch.allclose(dequantize_per_group(q, scale, zero, 32), w, atol=0.001, rtol=0.01)


def test_clip_ratio_shrinks_the_range() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    _, full, _ = quantize_per_group_asymmetric(w, 4, 64)
    _, clipped, _ = quantize_per_group_asymmetric(w, 4, 64, clip_ratio=0.5)
    assert torch.allclose(clipped, full * 0.5, rtol=1e-4)
    ratios = torch.tensor([[1.0], [0.5]]).repeat(4, 1)
    _, per_row, _ = quantize_per_group_asymmetric(w, 4, 64, clip_ratio=ratios)
    assert torch.allclose(per_row[1::2], full[1::2] * 0.5, rtol=1e-4)
    assert torch.allclose(per_row[::2], full[::2])


def test_float_zero_point_spans_exactly_the_group_range() -> None:
    scale, zero = asymmetric_params(
        torch.tensor([0.3]), torch.tensor([2.0]), 4, integer_zero=False
    )
    assert torch.allclose((0 - zero) * scale, torch.tensor([0.3]))
    assert torch.allclose((15 - zero) * scale, torch.tensor([2.0]))


def test_values_on_a_q4_1_grid_quantise_losslessly() -> None:
    """A group already on a min + k * d grid (GGUF Q4_1) comes back unchanged."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 32)).float()
    codes[:, 0], codes[:, 1] = 0, 15
    w = codes * 0.037 + 0.21  # all positive, offset not a multiple of the step
    q, scale, zero = quantize_per_group_asymmetric(w, 4, 32, integer_zero=False)
    assert torch.allclose(dequantize_per_group(q, scale, zero, 32), w, atol=1e-6)
    q, scale, zero = quantize_per_group_asymmetric(w, 4, 32)
    assert not torch.allclose(dequantize_per_group(q, scale, zero, 32), w, atol=1e-3)


@pytest.mark.parametrize(("low", "high"), [(0.3, 2.0), (-1.0, 2.0), (-3.0, -0.5)])
def test_integer_zero_keeps_zero_exact(low: float, high: float) -> None:
    scale, zero = asymmetric_params(torch.tensor([low]), torch.tensor([high]), 8)
    assert float(zero) == round(float(zero))
    code = quantize_to_grid(torch.zeros(1), scale, zero, 8)
    assert float((code - zero) * scale) == 0.0


@pytest.mark.parametrize("integer_zero", [True, False])
def test_constant_groups_stay_exact(integer_zero: bool) -> None:
    w = torch.full((2, 32), 100.0)
    w[1] = -3.5
    q, scale, zero = quantize_per_group_asymmetric(w, 4, 32, integer_zero=integer_zero)
    assert torch.allclose(dequantize_per_group(q, scale, zero, 32), w)


def test_per_token_scales_rows_independently() -> None:
    x = torch.stack([torch.linspace(-1, 1, 16), torch.linspace(-100, 100, 16)])
    q, scale = quantize_per_token_symmetric(x)
    assert scale.shape == (2, 1)
    assert torch.allclose(q.float() * scale, x, atol=float(scale.max()) / 2)
    assert int(q.abs().amax()) == 127


def test_pad_to_multiple_pads_with_zeros_on_the_given_dim() -> None:
    w = torch.ones(3, 576)
    padded = pad_to_multiple(w, 128, dim=1)
    assert padded.shape == (3, 640)
    assert torch.equal(padded[:, :576], w) and int(padded[:, 576:].abs().sum()) == 0
    assert pad_to_multiple(w, 64, dim=1) is w
    assert pad_to_multiple(w, 16, dim=0).shape == (16, 576)


@pytest.mark.parametrize("bits", [0, 1, 9, 4.0, True])
def test_bits_out_of_range_is_a_config_error(bits: object) -> None:
    with pytest.raises(ConfigError) as info:
        quantize_per_channel_symmetric(torch.randn(2, 8), bits=bits)  # type: ignore[arg-type]
    assert info.value.param == "bits"


def test_group_size_not_dividing_k_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        quantize_per_group_asymmetric(torch.randn(4, 576), 4, 128)
    assert info.value.param == "group_size" and "576" in info.value.message


def test_clip_ratio_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        quantize_per_group_asymmetric(torch.randn(4, 64), 4, 32, clip_ratio=1.5)
    assert info.value.param == "clip_ratio"

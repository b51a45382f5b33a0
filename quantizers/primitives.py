"""Quantise / dequantise primitives shared by every method.

All methods (RTN, GPTQ, SmoothQuant, mixed precision, ...) express their result
in the same two grids, so the runtime modules can be built from any of them:

* symmetric per output channel: ``w ≈ q * scale`` with q in
  [-(2**(bits-1) - 1), 2**(bits-1) - 1] (int8 weights, W8A8 activations);
* asymmetric per group of ``group_size`` input channels:
  ``w ≈ (q - zero) * scale`` with q in [0, 2**bits - 1] and ``zero`` the
  float zero point of each group, i.e. ``-min / scale`` (int4 weights).

Weights are [N, K] = [out_features, in_features], as in nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantizers.errors import ConfigError

# Scales never go below this, so all-zero rows or groups do not divide by zero.
_MIN_SCALE = 1e-8

# Output rows rounded per step: the float temporaries of a step stay a few MiB
# even for a [49152, 576] vocabulary projection, instead of a full float copy
# of the matrix on top of the float model being quantised.
ROW_CHUNK = 4096


def _row_chunks(n: int) -> list[slice]:
    return [slice(start, min(start + ROW_CHUNK, n)) for start in range(0, n, ROW_CHUNK)]


def check_bits(bits: int, low: int = 2, high: int = 8, param: str = "bits") -> None:
    """Reject a bit width the integer grids here cannot represent."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"{param} must be an integer in {low}..{high}, got {bits!r}", param)


def symmetric_qmax(bits: int) -> int:
    """Largest magnitude of a symmetric grid; the grid is [-qmax, qmax] so that
    negation is exact and the int8 zero point is 0."""
    return 2 ** (bits - 1) - 1


def quantize_per_channel_symmetric(w: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Round-to-nearest symmetric quantisation with one scale per output row.

    Returns (q int8 [N, K], scale float32 [N]). Rows are rounded in chunks
    (ROW_CHUNK), so memory beyond the result stays small for any N.
    """
    check_bits(bits)
    w = w.detach()
    qmax = symmetric_qmax(bits)
    low, high = w.aminmax(dim=1)
    scale = (torch.maximum(-low.float(), high.float()) / qmax).clamp_min(_MIN_SCALE)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for rows in _row_chunks(w.shape[0]):
        part = torch.div(w[rows].float(), scale[rows, None]).round_().clamp_(-qmax, qmax)
        q[rows] = part
    return q, scale


def dequantize_per_channel(q: Tensor, scale: Tensor) -> Tensor:
    """Inverse of quantize_per_channel_symmetric, as float32 [N, K]."""
    return q.float() * scale.float()[:, None]


def quantize_per_token_symmetric(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Dynamic activation quantisation: one symmetric scale per row (token).

    Returns (q int8 [M, K], scale float32 [M, 1]); used at run time by W8A8.
    """
    x = x.float()
    qmax = symmetric_qmax(bits)
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_MIN_SCALE)
    q = torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def asymmetric_params(
    wmin: Tensor, wmax: Tensor, bits: int, *, integer_zero: bool = True
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map [wmin, wmax] onto [0, 2**bits - 1].

    With integer_zero (the classic GPTQ/W8A8 convention) the range is widened
    to include 0 and the zero point rounded, so 0.0 is exactly representable —
    what integer activation grids need for their zero-point correction. Without
    it the zero point is a float and the grid spans exactly each group's range:
    the same grid as GGUF's Q4_1 blocks, which a rounded zero point would shift
    and re-round (int4 g32 on SmolLM2 goes from ~9% to ~0% weight error).
    """
    levels = 2**bits - 1
    wmin, wmax = wmin.float(), wmax.float()
    # A constant group has no range to span; include 0 so its value is a grid end.
    widen = (wmax - wmin) <= 1e-5 * torch.maximum(wmin.abs(), wmax.abs())
    if integer_zero:
        widen = torch.ones_like(widen)
    wmin = torch.where(widen, wmin.clamp(max=0.0), wmin)
    wmax = torch.where(widen, wmax.clamp(min=0.0), wmax)
    scale = ((wmax - wmin) / levels).clamp_min(_MIN_SCALE)
    zero = -wmin / scale
    if integer_zero:
        zero = torch.round(zero).clamp_(0, levels)
    return scale, zero


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round w onto the asymmetric grid given by broadcastable scale and zero.

    Returns the integer codes as float32 (GPTQ-style methods keep working in
    float); callers convert to uint8 once at the end.
    """
    return torch.round(w.float() / scale + zero).clamp_(0, 2**bits - 1)


def _check_group(k: int, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ConfigError(
            f"group_size must be a positive integer, got {group_size!r}", "group_size"
        )
    if k % group_size:
        raise ConfigError(
            f"group_size {group_size} does not divide the input size {k}; "
            "pad the weight first (pad_to_multiple)",
            "group_size",
        )


def quantize_per_group_asymmetric(
    w: Tensor,
    bits: int = 4,
    group_size: int = 128,
    clip_ratio: float | Tensor = 1.0,
    *,
    integer_zero: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest asymmetric quantisation with one (scale, zero) per group.

    `clip_ratio` shrinks each group's [min, max] range before the grid is
    chosen (a float for all groups, or a tensor broadcastable to [N, K // g]),
    which AWQ/clipping searches use to trade outlier error for resolution.
    integer_zero: see asymmetric_params (the int4 runtime takes float zeros).

    Returns (q uint8 [N, K] in 0..2**bits-1, scale float32 [N, K // g],
    zero float32 [N, K // g]). Rows are rounded in chunks (ROW_CHUNK).
    """
    check_bits(bits)
    n, k = w.shape
    _check_group(k, group_size)
    groups = w.detach().reshape(n, k // group_size, group_size)
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32)
    if bool((ratio <= 0).any()) or bool((ratio > 1).any()):
        raise ConfigError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}", "clip_ratio")
    low, high = groups.aminmax(dim=-1)
    scale, zero = asymmetric_params(
        low.float() * ratio, high.float() * ratio, bits, integer_zero=integer_zero
    )
    q = torch.empty((n, k // group_size, group_size), dtype=torch.uint8, device=w.device)
    for rows in _row_chunks(n):
        q[rows] = quantize_to_grid(groups[rows], scale[rows, :, None], zero[rows, :, None], bits)
    return q.reshape(n, k), scale, zero


def dequantize_per_group(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """Inverse of quantize_per_group_asymmetric, as float32 [N, K]."""
    n, k = q.shape
    _check_group(k, group_size)
    groups = q.float().reshape(n, k // group_size, group_size)
    return ((groups - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, k)


def pad_to_multiple(w: Tensor, multiple: int, dim: int) -> Tensor:
    """Zero-pad `dim` of w up to the next multiple (a no-op when it divides).

    Zero weights in padded input channels contribute nothing to the matmul, and
    the runtime modules pad activations with zeros to match.
    """
    size = w.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return w
    pad = [0, 0] * (w.dim() - 1 - dim % w.dim()) + [0, extra]
    return F.pad(w, pad)

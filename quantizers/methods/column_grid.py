"""Column-at-a-time views of the shared quantisation grids (quantizers.primitives).

Round-to-nearest quantises a whole matrix at once, but error-feedback methods
(GPTQ) fit a group's grid, round one column, then move the columns not yet
rounded. These classes expose exactly those three steps on the same grids and
conventions as the primitives, so the codes they produce feed the same runtime
modules as RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantizers.errors import ConfigError
from quantizers.packing import INT4_MID
from quantizers.primitives import (
    asymmetric_params,
    dequantize_per_channel,
    dequantize_per_group,
    pad_to_multiple,
    quantize_per_channel_symmetric,
    quantize_per_group_asymmetric,
    quantize_to_grid,
    symmetric_qmax,
)

# The int4 and int8 kernels read their scales (and int4 offsets) in bfloat16.
KERNEL_PARAM_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ColumnGrid:
    """A grid GPTQ can fit per group and round one column at a time on.

    group_size None means one scale per output channel over all inputs.
    """

    bits: int
    group_size: int | None
    symmetric: bool

    def pad_columns(self, w: Tensor) -> Tensor:
        """Zero-pad the input dimension to a whole number of groups."""
        return w if self.group_size is None else pad_to_multiple(w, self.group_size, dim=1)

    def fit(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Scale [N] and zero point [N] (zeros for symmetric) of the columns w [N, k]."""
        if self.symmetric:
            scale = (w.abs().amax(dim=1) / symmetric_qmax(self.bits)).clamp_min(1e-8)
            return _as_kernel_param(scale), torch.zeros_like(scale)
        scale, zero = asymmetric_params(w.amin(dim=1), w.amax(dim=1), self.bits)
        return _as_kernel_param(scale), zero

    def fit_all(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Scales and zero points [N, G] of every group of w [N, K], fitted up front."""
        k = w.shape[1]
        group = self.group_size or k
        pairs = [self.fit(w[:, g : g + group]) for g in range(0, k, group)]
        return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)

    def offset(self, scale: Tensor, zero: Tensor) -> Tensor:
        """What the kernel adds after scaling a code (bf16 offset; 0 when symmetric).

        Constant per group, so column-by-column callers compute it once per group.
        """
        if self.symmetric:
            return torch.zeros_like(scale)
        return _as_kernel_param((INT4_MID - zero) * scale)

    def round(
        self, column: Tensor, scale: Tensor, zero: Tensor, offset: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Float codes and the kernel's dequantised value of one column [N].

        The dequantised value is what the kernel will compute (bf16 scale and,
        for int4, bf16 offset from `offset()`), so the error fed back is the
        error served.
        """
        if self.symmetric:
            qmax = symmetric_qmax(self.bits)
            codes = torch.round(column / scale).clamp_(-qmax, qmax)
            return codes, codes * scale
        codes = quantize_to_grid(column, scale, zero, self.bits)
        return codes, (codes - INT4_MID) * scale + offset


def int_grid(bits: int, group_size: int | None) -> ColumnGrid:
    """The grid the runtime serves at this width: 8 bits per channel, fewer per group."""
    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8 (the widths with kernels), got {bits!r}", "bits")
    if bits == 8:
        return ColumnGrid(bits=8, group_size=None, symmetric=True)
    return ColumnGrid(bits=bits, group_size=group_size, symmetric=False)


def rtn_weight(weight: Tensor, bits: int, group_size: int) -> Tensor:
    """Round-to-nearest on the grid served at this width, dequantised to [N, K] float32.

    The baseline every smarter method is compared against, on the same grid.
    """
    if bits == 8:
        return dequantize_per_channel(*quantize_per_channel_symmetric(weight, 8))
    padded = pad_to_multiple(weight.detach().float(), group_size, dim=1)
    q, scale, zero = quantize_per_group_asymmetric(padded, bits, group_size)
    return dequantize_per_group(q, scale, zero, group_size)[:, : weight.shape[1]]


def _as_kernel_param(value: Tensor) -> Tensor:
    """value rounded the way the kernel will store it, kept in float32."""
    return value.to(KERNEL_PARAM_DTYPE).to(torch.float32)

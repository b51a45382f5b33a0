"""One refinement step of a quantised layer's grid, weighted by its input energy.

Round-to-nearest fits each group's grid to the group's min and max, which
spends resolution on outliers and ignores which input channels carry signal.
With the layer's per-input-channel mean square h_k, the output error of
weight errors e is about Σ_k h_k e_k². For fixed codes the best per-group
(scale, offset) under that weighting is a weighted linear regression, and for
fixed (scale, offset) the best codes are the nearest grid points; alternating
the two (a Lloyd step) never increases the weighted error, and moves each
group's clipping range to where the signal is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from quantizers.methods.column_grid import KERNEL_PARAM_DTYPE
from quantizers.packing import INT4_MID
from quantizers.primitives import symmetric_qmax

# Groups whose codes are (almost) all equal keep their previous grid.
_MIN_CODE_VARIANCE = 1e-6
# Output channels refined at once in an int8 layer.
_ROWS_PER_STEP = 4096


def _kernel(value: Tensor) -> Tensor:
    return value.to(KERNEL_PARAM_DTYPE).to(torch.float32)


def padded_to(weight: Tensor, width: int) -> Tensor:
    """weight [N, K] zero-padded to [N, width] input channels, as the int4 layout
    stores it (the same tensor when no padding is needed: no second copy)."""
    return weight if weight.shape[1] == width else F.pad(weight, (0, width - weight.shape[1]))


@dataclass(frozen=True)
class GroupGrid:
    """An int4 layer as the kernel sees it: w = (q - 8) · scale + offset per group.

    codes [N, Kp], scale and offset [N, G]; weight is the float weight [N, K],
    K <= Kp, and importance the input channels' mean square [Kp]. The weight is
    zero-padded to Kp only for the call: a padded copy kept for every layer
    would be a second float model.
    """

    codes: Tensor
    scale: Tensor
    offset: Tensor
    group_size: int

    @property
    def zero(self) -> Tensor:
        """The primitives' (fractional) zero point: w = (q - zero) · scale."""
        return INT4_MID - self.offset / self.scale

    def dequantized(self) -> Tensor:
        n, kp = self.codes.shape
        q = self.codes.float().reshape(n, -1, self.group_size) - INT4_MID
        return (q * self.scale[..., None] + self.offset[..., None]).reshape(n, kp)

    def weighted_error(self, weight: Tensor, importance: Tensor) -> float:
        return _weighted_error(
            self.dequantized(), padded_to(weight, self.codes.shape[1]), importance
        )

    def refined(self, weight: Tensor, importance: Tensor) -> GroupGrid:
        """One Lloyd step: least-squares (scale, offset), then re-rounded codes."""
        n, kp = self.codes.shape
        shape = (n, kp // self.group_size, self.group_size)
        w = padded_to(weight, kp).reshape(shape)
        h = importance.reshape(1, *shape[1:]).expand(shape) + 1e-12
        q = self.codes.float().reshape(shape) - INT4_MID
        total = h.sum(-1)
        mean_q = (h * q).sum(-1) / total
        mean_w = (h * w).sum(-1) / total
        var_q = (h * (q - mean_q[..., None]) ** 2).sum(-1) / total
        cov = (h * (q - mean_q[..., None]) * (w - mean_w[..., None])).sum(-1) / total
        usable = (var_q > _MIN_CODE_VARIANCE) & (cov > 0)
        scale = _kernel(torch.where(usable, cov / var_q.clamp_min(_MIN_CODE_VARIANCE), self.scale))
        offset = _kernel(torch.where(usable, mean_w - scale * mean_q, self.offset))
        codes = torch.round((w - offset[..., None]) / scale[..., None]) + INT4_MID
        codes = codes.clamp_(0, 15).reshape(n, kp).to(torch.uint8)
        return GroupGrid(codes, scale, offset, self.group_size)


@dataclass(frozen=True)
class ChannelGrid:
    """An int8 layer: w = q · scale per output channel, q in [-127, 127]."""

    codes: Tensor
    scale: Tensor

    def dequantized(self) -> Tensor:
        return self.codes.float() * self.scale[:, None]

    def weighted_error(self, weight: Tensor, importance: Tensor) -> float:
        return _weighted_error(self.dequantized(), weight, importance)

    def refined(self, weight: Tensor, importance: Tensor) -> ChannelGrid:
        """Least-squares scale per channel for the current codes, then re-rounded codes.

        Every step is per output channel, so it runs on slices of rows: a tied
        lm_head has 49k of them, and whole-matrix float temporaries would be
        several times its float weight at once.
        """
        parts = [
            self._refined_rows(weight[rows], importance, rows)
            for rows in _row_slices(weight.shape[0])
        ]
        return ChannelGrid(torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts]))

    def _refined_rows(
        self, weight: Tensor, importance: Tensor, rows: slice
    ) -> tuple[Tensor, Tensor]:
        q = self.codes[rows].float()
        old_scale = self.scale[rows]
        num = (importance * q * weight).sum(-1)
        den = (importance * q * q).sum(-1)
        scale = _kernel(torch.where(den > 0, num / den.clamp_min(1e-12), old_scale))
        scale = torch.where(scale > 0, scale, old_scale)
        qmax = symmetric_qmax(8)
        codes = torch.round(weight / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
        return codes, scale


def _row_slices(rows: int) -> list[slice]:
    return [
        slice(start, min(start + _ROWS_PER_STEP, rows)) for start in range(0, rows, _ROWS_PER_STEP)
    ]


def _weighted_error(dequantized: Tensor, weight: Tensor, importance: Tensor) -> float:
    """Σ importance · (dequantized - weight)², computed in place in `dequantized`
    (a fresh tensor): the same operations as the plain expression, one temporary."""
    return float(dequantized.sub_(weight).pow_(2).mul_(importance).sum())

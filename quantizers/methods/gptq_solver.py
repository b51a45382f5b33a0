"""The GPTQ column solver on plain tensors (no model, no hooks).

Quantising column k of W changes the layer output by (w_k - q_k) x_k. GPTQ
quantises the columns one at a time and, after each, moves the remaining
columns by the amount that cancels that error best under the input Hessian
(Frantar et al., 2022): W[:, k+1:] -= (w_k - q_k) / U_kk · U[k, k+1:], where U
is the upper Cholesky factor of H⁻¹. Updates are applied lazily per block of
columns so most of the work is one matrix product per block.

Group scales/zeros are fitted as the columns reach each group, on the weights
as already corrected by the error of the columns before them, which is where
most of GPTQ's gain at group size 128 comes from. With act-order the columns
are visited by decreasing Hessian diagonal; then groups are fitted up front
on the original weights ("static groups") because the int4 kernel needs each
group to be a contiguous run of input channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from quantizers.methods.column_grid import ColumnGrid

# Damping grows by this factor each time the Cholesky factorisation fails.
_DAMP_GROWTH = 10.0
_MAX_DAMP_TRIES = 6


@dataclass(frozen=True)
class GPTQSolution:
    """Codes and grid parameters of one quantised weight matrix.

    codes:   integer codes [N, K] in the grid's code range (K padded to the group size).
    scale:   [N, G] per group (G = K / group_size) or [N, 1] per channel.
    zero:    [N, G] like scale, or None for symmetric grids.
    weight:  the dequantised weight [N, K] (float32), what the kernel will compute with.
    proxy_loss: GPTQ's own objective Σ (w - q)² / [H⁻¹]_kk / 2, for the report.
    damp:    the relative damping that made H positive definite.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    weight: Tensor
    proxy_loss: float
    damp: float


def _inverse_cholesky_upper(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU with λ = damp · mean(diag H).

    With R = J·chol(J H J)·J (J reverses the order) H = R Rᵀ with R upper, so
    H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹: one factorisation and one triangular inverse
    instead of a factorisation, an inverse and a second factorisation. Float32
    suffices at this damping (it is what the solver works in) and halves the
    time of the 1536-wide down_proj factorisation. Damping is raised until the
    factorisation succeeds, since calibration data can leave H numerically
    singular (e.g. a constant input channel).
    """
    h = hessian.to(torch.float32).flip(0, 1)
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(_MAX_DAMP_TRIES):
        factor, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            upper_r = factor.flip(0, 1)
            inverse = torch.linalg.solve_triangular(upper_r, eye, upper=True)
            if bool(torch.isfinite(inverse).all()):
                return inverse, damp
        damp *= _DAMP_GROWTH
    raise ValueError("the layer's input Hessian is not positive definite even with heavy damping")


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one thread for the duration.

    The column sweep is thousands of tiny ops; spreading each over threads
    only adds synchronisation, which on a busy machine (cores shared with
    other processes) made a sweep ~40x slower than on one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    grid: ColumnGrid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GPTQSolution:
    """Quantise weight [N, K] against the input Hessian [K, K] with error feedback.

    K is padded to the grid's group size with zero columns that see no input,
    which GPTQ treats like any dead input channel.
    """
    with single_threaded():
        return _solve(weight, hessian, grid, damp, block_size, act_order)


def _solve(
    weight: Tensor,
    hessian: Tensor,
    grid: ColumnGrid,
    damp: float,
    block_size: int,
    act_order: bool,
) -> GPTQSolution:
    w = grid.pad_columns(weight.detach().to(torch.float32))
    k_padded = w.shape[1]
    h = torch.zeros(k_padded, k_padded, dtype=torch.float32, device=w.device)
    k = hessian.shape[0]
    h[:k, :k] = hessian.to(torch.float32)

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group = grid.group_size or k_padded
    # Per-channel grids are fitted on the whole row before any column moves,
    # as are all groups under act-order (see the module docstring).
    # A partial last group (576 inputs in groups of 128) is fitted on its real
    # columns only: the int4 kernel stores it at its real width and never sees
    # the padding, so the grid need not stretch to represent its zeros.
    static_params = grid.fit_all(w[:, :k]) if act_order or grid.group_size is None else None
    perm = (
        torch.argsort(torch.diag(h), descending=True) if act_order
        else torch.arange(k_padded, device=w.device)
    )
    w = w[:, perm]
    h = h[perm][:, perm]
    upper, used_damp = _inverse_cholesky_upper(h, damp)

    # Blocks hold whole groups so a group's fit sees all earlier corrections.
    block = block_size if static_params is not None else max(block_size, group) // group * group

    codes = torch.zeros_like(w)
    dequant = torch.zeros_like(w)
    groups = k_padded // group
    scales: list[Tensor | None] = [None] * groups
    zeros: list[Tensor | None] = [None] * groups
    offsets: list[Tensor | None] = [None] * groups
    if static_params is not None:
        for g in range(groups):
            scales[g] = static_params[0][:, g].contiguous()
            zeros[g] = static_params[1][:, g].contiguous()
            offsets[g] = grid.offset(scales[g], zeros[g])
    group_of = (perm // group).tolist()
    loss = 0.0

    for start in range(0, k_padded, block):
        end = min(start + block, k_padded)
        # Transposed so each column is a contiguous row: the sweep below is
        # thousands of small ops, and strided columns made each several times slower.
        w_block = w[:, start:end].T.contiguous()
        codes_block = torch.empty_like(w_block)
        deq_block = torch.empty_like(w_block)
        err_block = torch.empty_like(w_block)
        u_block = upper[start:end, start:end]
        for j in range(end - start):
            column = start + j
            g = group_of[column]
            if static_params is None and column % group == 0:
                scales[g], zeros[g] = grid.fit(w_block[j : j + min(group, k - column)].T)
                offsets[g] = grid.offset(scales[g], zeros[g])
            col_codes, col_deq = grid.round(w_block[j], scales[g], zeros[g], offsets[g])
            codes_block[j] = col_codes
            deq_block[j] = col_deq
            err = (w_block[j] - col_deq) / u_block[j, j]
            w_block[j + 1 :].addr_(u_block[j, j + 1 :], err, alpha=-1.0)
            err_block[j] = err
        codes[:, start:end] = codes_block.T
        dequant[:, start:end] = deq_block.T
        w[:, end:] -= err_block.T @ upper[start:end, end:]
        loss += float((err_block * err_block).sum()) / 2

    inverse_perm = torch.argsort(perm)
    scale = torch.stack([s for s in scales if s is not None], dim=1)
    zero = None if grid.symmetric else torch.stack([z for z in zeros if z is not None], dim=1)
    return GPTQSolution(
        codes=codes[:, inverse_perm].to(torch.int32),
        scale=scale.to(torch.float32),
        zero=None if zero is None else zero.to(torch.float32),
        weight=dequant[:, inverse_perm].to(torch.float32),
        proxy_loss=loss,
        damp=used_damp,
    )

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
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H).

    Damping is raised until the factorisation succeeds, since calibration
    data can leave H numerically singular (e.g. a constant input channel).
    """
    mean_diag = float(torch.diag(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for _ in range(_MAX_DAMP_TRIES):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
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
    h = torch.zeros(k_padded, k_padded, dtype=torch.float64)
    k = hessian.shape[0]
    h[:k, :k] = hessian.to(torch.float64)

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group = grid.group_size or k_padded
    # Per-channel grids are fitted on the whole row before any column moves,
    # as are all groups under act-order (see the module docstring).
    static_params = grid.fit_all(w) if act_order or grid.group_size is None else None
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k_padded)
    w = w[:, perm]
    h = h[perm][:, perm]
    upper64, used_damp = _inverse_cholesky_upper(h, damp)
    upper = upper64.to(torch.float32)

    # Blocks hold whole groups so a group's fit sees all earlier corrections.
    block = block_size if static_params is not None else max(block_size, group) // group * group

    codes = torch.zeros_like(w, dtype=torch.int32)
    dequant = torch.zeros_like(w)
    scales: list[Tensor | None] = [None] * (k_padded // group)
    zeros: list[Tensor | None] = [None] * (k_padded // group)
    if static_params is not None:
        for g in range(k_padded // group):
            scales[g], zeros[g] = static_params[0][:, g], static_params[1][:, g]
    loss = 0.0

    for start in range(0, k_padded, block):
        end = min(start + block, k_padded)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        u_block = upper[start:end, start:end]
        for j in range(end - start):
            column = start + j
            g = int(perm[column]) // group
            if static_params is None and column % group == 0:
                scales[g], zeros[g] = grid.fit(w_block[:, j : j + group])
            col_codes, col_deq = grid.round(w_block[:, j], scales[g], zeros[g])
            codes[:, column] = col_codes
            dequant[:, column] = col_deq
            d = u_block[j, j]
            err = (w_block[:, j] - col_deq) / d
            w_block[:, j + 1 :] -= err.unsqueeze(1) * u_block[j, j + 1 :].unsqueeze(0)
            err_block[:, j] = err
        w[:, end:] -= err_block @ upper[start:end, end:]
        loss += float((err_block * err_block).sum()) / 2

    inverse_perm = torch.argsort(perm)
    scale = torch.stack([s for s in scales if s is not None], dim=1)
    zero = None if grid.symmetric else torch.stack([z for z in zeros if z is not None], dim=1)
    return GPTQSolution(
        codes=codes[:, inverse_perm],
        scale=scale.to(torch.float32),
        zero=None if zero is None else zero.to(torch.float32),
        weight=dequant[:, inverse_perm].to(torch.float32),
        proxy_loss=loss,
        damp=used_damp,
    )

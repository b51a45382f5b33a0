"""SmoothQuant's alpha search: the alpha it picks has the lowest real W8A8 error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantizers.calibration import collect_activation_stats
from quantizers.methods.smooth_groups import find_groups
from quantizers.methods.smoothquant import (
    ALPHA_GRID,
    SmoothQuantConfig,
    choose_alpha,
    smoothing_factors,
)
from quantizers.runtime import W8A8Linear

from .test_w8a8 import outlier_llama


def real_w8a8_error(
    rows: torch.Tensor, weights: list[torch.Tensor], factors: torch.Tensor
) -> float:
    """Summed relative output error of real int8 x int8 modules on smoothed rows."""
    total = 0.0
    for weight in weights:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data = weight.detach() * factors
        module = W8A8Linear.from_float(linear)
        reference = rows @ weight.detach().t()
        error = module(rows / factors).float() - reference
        total += float(error.square().sum() / reference.square().sum())
    return total


@pytest.mark.parametrize("group_index", [0, 2])
def test_alpha_search_picks_the_alpha_with_the_lowest_error(group_index: int) -> None:
    model = outlier_llama()
    batches = [
        torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    group = find_groups(model)[group_index]
    stats = collect_activation_stats(model, batches, group.consumers, keep_rows=128)
    observed = stats[group.consumers[0]]
    weights = [model.get_submodule(name).weight for name in group.consumers]
    best, factors, losses = choose_alpha(group, observed, weights, SmoothQuantConfig())
    assert tuple(losses) == ALPHA_GRID
    assert losses[best] == min(losses.values())
    assert torch.equal(factors, smoothing_factors(observed.abs_max, weights, best))
    worst = max(losses, key=losses.__getitem__)
    assert losses[worst] > losses[best]
    rows = observed.rows.float()
    best_error = real_w8a8_error(rows, weights, factors)
    worst_error = real_w8a8_error(
        rows, weights, smoothing_factors(observed.abs_max, weights, worst)
    )
    assert best_error < worst_error


def test_a_fixed_alpha_is_used_as_given() -> None:
    model = outlier_llama()
    group = find_groups(model)[0]
    stats = collect_activation_stats(model, [torch.arange(32).unsqueeze(0)], group.consumers)
    weights = [model.get_submodule(name).weight for name in group.consumers]
    alpha, _, losses = choose_alpha(
        group, stats[group.consumers[0]], weights, SmoothQuantConfig(alpha=0.3)
    )
    assert alpha == 0.3 and losses == {}

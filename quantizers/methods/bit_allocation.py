"""Choose a bit width per layer under a memory and/or quality budget.

A multiple-choice knapsack: every layer takes exactly one option (int4, int8,
float), each with a byte cost and an estimated loss (KL increase, additive over
layers). One dynamic programme over discretised byte budgets gives, for every
budget, the least total loss; a memory budget reads its entry, a quality budget
finds the cheapest budget whose loss fits. The programme counts each option's
bytes *above the layer's cheapest option*, rounded up to the grid: a plan it
accepts always meets its budget, and only layers given extra width pay the
rounding (counting whole costs made every layer pay it, which on SmolLM2 ate
most of the difference between 4.6 and 5 bits per weight).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Byte-budget resolution of the dynamic programme (cells over the widest extra).
_CELLS = 20000


@dataclass(frozen=True)
class LayerOption:
    """One way to store one layer: its width, stored bytes and estimated loss."""

    bits: int
    bytes: int
    loss: float


@dataclass(frozen=True)
class Plan:
    """A width per layer with its total bytes, weights and estimated loss."""

    bits: dict[str, int]
    bytes: int
    weights: int
    loss: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.weights if self.weights else 0.0

    @property
    def ppl_increase_pct(self) -> float:
        """Estimated perplexity increase: exp(Δ mean NLL) - 1, with Δ NLL ≈ KL."""
        return 100.0 * math.expm1(self.loss)


class BudgetUnreachable(Exception):
    """No plan meets the budget; `closest` is the plan that comes nearest."""

    def __init__(self, reason: str, closest: Plan) -> None:
        super().__init__(reason)
        self.reason = reason
        self.closest = closest


class Allocator:
    """The knapsack over `options` (layer -> its options), solved once, queried per budget."""

    def __init__(self, options: Mapping[str, Sequence[LayerOption]], weights: Mapping[str, int]):
        self.names = list(options)
        self.options = {name: list(opts) for name, opts in options.items()}
        self.weights = sum(weights[name] for name in self.names)
        self._floor = {name: min(o.bytes for o in opts) for name, opts in self.options.items()}
        self.base = sum(self._floor.values())
        most = sum(max(o.bytes for o in opts) for opts in self.options.values()) - self.base
        self.unit = max(1, math.ceil(most / _CELLS))
        self._solve()

    def _units(self, name: str, option: LayerOption) -> int:
        return math.ceil((option.bytes - self._floor[name]) / self.unit)

    def _cell_for(self, max_bytes: int) -> int:
        """The last cell whose plans fit in max_bytes (negative when none does)."""
        return (max_bytes - self.base) // self.unit

    def _solve(self) -> None:
        cells = sum(max(self._units(n, o) for o in opts) for n, opts in self.options.items()) + 1
        best = torch.full((cells,), math.inf, dtype=torch.float64)
        best[0] = 0.0
        self._choices: list[torch.Tensor] = []
        for name in self.names:
            candidates = torch.full((len(self.options[name]), cells), math.inf, dtype=torch.float64)
            for i, option in enumerate(self.options[name]):
                shift = self._units(name, option)
                candidates[i, shift:] = best[: cells - shift] + option.loss
            best, choice = candidates.min(dim=0)
            self._choices.append(choice)
        # least loss with *at most* c units: a running minimum over c.
        self._best = best
        self._least = torch.cummin(best, dim=0)

    def _plan_at(self, cell: int) -> Plan:
        cell = int(self._least.indices[cell])
        bits: dict[str, int] = {}
        total_bytes = 0
        loss = 0.0
        for name, choice in zip(reversed(self.names), reversed(self._choices), strict=True):
            option = self.options[name][int(choice[cell])]
            bits[name] = option.bits
            total_bytes += option.bytes
            loss += option.loss
            cell -= self._units(name, option)
        return Plan(dict(reversed(bits.items())), total_bytes, self.weights, loss)

    def smallest(self) -> Plan:
        """The cheapest plan at all (every layer at its narrowest option)."""
        return self._plan_at(int(torch.nonzero(torch.isfinite(self._least.values))[0]))

    def best_within(self, max_bytes: int) -> Plan:
        """Least estimated loss within max_bytes, or BudgetUnreachable with the smallest plan."""
        cell = min(self._cell_for(max_bytes), len(self._best) - 1)
        if cell < 0 or not math.isfinite(float(self._least.values[cell])):
            smallest = self.smallest()
            raise BudgetUnreachable(
                f"the smallest plan needs {smallest.bytes} bytes "
                f"({smallest.bits_per_weight:.3f} bits per weight)",
                smallest,
            )
        return self._plan_at(cell)

    def cheapest_with_loss(self, max_loss: float, max_bytes: int | None = None) -> Plan:
        """Fewest bytes whose estimated loss is at most max_loss (within max_bytes if given)."""
        fits = torch.nonzero(self._least.values <= max_loss)
        limit = len(self._best) - 1 if max_bytes is None else self._cell_for(max_bytes)
        if len(fits) == 0 or int(fits[0]) > limit:
            closest = (
                self.best_within(max_bytes)
                if max_bytes is not None
                else self._plan_at(len(self._best) - 1)
            )
            raise BudgetUnreachable(
                f"the best reachable plan has an estimated perplexity increase of "
                f"{closest.ppl_increase_pct:.2f}% at {closest.bits_per_weight:.3f} bits per weight",
                closest,
            )
        return self._plan_at(int(fits[0]))

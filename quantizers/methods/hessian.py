"""Second-order input statistics of a linear layer, as GPTQ needs them.

A linear layer's output error for a weight perturbation ΔW on inputs X is
‖ΔW Xᵀ‖² = tr(ΔW H ΔWᵀ) with H = XᵀX, so the input Hessian is all GPTQ needs
to know about the calibration data. It is accumulated batch by batch so no
activation outlives the forward pass that produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class HessianAccumulator:
    """Running mean of xxᵀ over every token a linear layer has seen.

    The product is computed in bf16 (the activations the low-bit kernels
    consume, and a ~5x faster CPU matmul than float32) and summed in float32,
    so rounding stays per batch and averages out instead of compounding.
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self._sum: Tensor | None = None  # made on the device of the first inputs
        self.tokens = 0

    def add(self, inputs: Tensor) -> None:
        """Account for one batch of layer inputs of shape [..., in_features]."""
        x = inputs.detach().reshape(-1, self.in_features).to(torch.bfloat16)
        if self._sum is None:
            self._sum = torch.zeros(
                self.in_features, self.in_features, dtype=torch.float32, device=x.device
            )
        self._sum += (x.T @ x).to(torch.float32)
        self.tokens += x.shape[0]

    def hessian(self) -> Tensor:
        """The mean xxᵀ (float32, [in_features, in_features]).

        The scale does not matter to GPTQ (its damping is relative to the
        diagonal), the mean only keeps magnitudes independent of token count.
        """
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self._sum / self.tokens


def output_error(delta: Tensor, hessian: Tensor) -> float:
    """Mean squared output error per token of a weight perturbation delta [N, K].

    tr(ΔW H ΔWᵀ) is exactly the mean over calibration tokens of ‖ΔW x‖², the
    quantity GPTQ minimises; reporting it lets callers compare methods on the
    same layer without rerunning the data.
    """
    d = delta.to(torch.float32)
    return float(((d @ hessian.to(torch.float32)) * d).sum())


class AllInputsSeen(Exception):
    """Raised by a recorder once every layer has had its input in this call.

    What the forward would compute after that (SmolLM2's down_proj output, a
    quarter of a block's matmul work) is never used by a Hessian pass, so the
    caller catches this and moves on to the next call.
    """


class HessianRecorder:
    """Forward hooks accumulating the input Hessian of each given linear layer.

    Layers that receive the very same input tensor in a forward call (q/k/v
    after one norm, gate/up after another) share one accumulator: their
    Hessians are identical, and XᵀX is the most expensive part of GPTQ's data
    pass. Call `next_call()` between forward calls so identity is only
    compared within one call.
    """

    def __init__(self, layers: dict[str, nn.Linear], stop_early: bool = False) -> None:
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.shares_input_of: dict[str, str] = {}
        self._seen: list[tuple[Tensor, str]] = []
        self._called: set[str] = set()
        self._stop_after = len(layers) if stop_early else None
        self._handles = [
            module.register_forward_pre_hook(self._hook_for(name))
            for name, module in layers.items()
        ]

    def _hook_for(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self._called.add(name)
            for other_input, other in self._seen:
                if other_input is x:
                    self.shares_input_of[name] = other
                    break
            else:
                self._seen.append((x, name))
                if name not in self.accumulators:
                    self.accumulators[name] = HessianAccumulator(module.in_features)
                self.accumulators[name].add(x)
            if len(self._called) == self._stop_after:
                raise AllInputsSeen

        return hook

    def next_call(self) -> None:
        self._seen.clear()
        self._called.clear()

    def hessian_of(self, name: str) -> Tensor:
        """The Hessian of layer `name` (its own or the one it shares)."""
        return self.accumulators[self.shares_input_of.get(name, name)].hessian()

    def groups(self, names: Sequence[str]) -> list[list[str]]:
        """names partitioned by shared input, in first-seen order."""
        grouped: dict[str, list[str]] = {}
        for name in names:
            grouped.setdefault(self.shares_input_of.get(name, name), []).append(name)
        return list(grouped.values())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        self._called.clear()

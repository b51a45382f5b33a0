"""GPT-2-style `Conv1D` projections turned into the `nn.Linear` they compute.

transformers' `Conv1D` is a linear layer whose weight is stored transposed
(`[in, out]`). Every method and runtime module here quantises `nn.Linear`
weights (`[out, in]`), so models are converted once, where they are loaded and
where artifacts rebuild them: the same numbers, and every projection becomes a
target like any other.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    # By name and shape, so that transformers' class needs no import here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def conv1d_as_linear(model: nn.Module) -> int:
    """Replace every `Conv1D` in `model` by an equal `nn.Linear` (on the same
    device, meta included); returns how many were replaced."""
    found = [
        (name, module) for name, module in model.named_modules() if _is_conv1d(module)
    ]
    for name, module in found:
        weight: torch.Tensor = module.weight
        linear = nn.Linear(
            weight.shape[0], weight.shape[1], bias=module.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        if weight.device.type != "meta":
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
        linear.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(found)

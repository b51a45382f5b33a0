"""Int8 weight-only linear: per-channel symmetric int8 weights, bf16 activations.

On CPU the matmul is torch's `_weight_int8pack_mm`, which reads the int8 weight
directly (a quarter of the float32 bytes), so decode — memory-bound — gets
faster. CUDA has no such op in torch, so there the int8 weight is cast to the
activation dtype inside the matmul and the per-channel scale applied after,
which is exact and still keeps only int8 weights resident.
"""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers.primitives import quantize_per_channel_symmetric
from quantizers.runtime.base import COMPUTE_DTYPE, QuantizedLinear, as_matrix


class Int8WeightOnlyLinear(QuantizedLinear):
    """y = x @ (q * scale).T + bias with q int8 [N, K] and scale [N]."""

    bits = 8

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", weight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.detach().to(COMPUTE_DTYPE).contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Self:
        """Round-to-nearest per-channel quantisation of a float linear."""
        q, scale = quantize_per_channel_symmetric(linear.weight, bits=8)
        return cls(q, scale, linear.bias)

    @classmethod
    def from_quantized(
        cls,
        q: Tensor,
        scale: Tensor,
        zero: Tensor | None = None,
        group_size: int | None = None,
        bias: Tensor | None = None,
    ) -> Self:
        """From a method's own int8 codes [N, K] and per-channel scales [N]."""
        if zero is not None or group_size is not None:
            raise ValueError("int8 weight-only is symmetric per channel: no zero or group_size")
        if q.dtype != torch.int8 or scale.shape != (q.shape[0],):
            raise ValueError("expected int8 codes [N, K] and a scale per output channel [N]")
        return cls(q, scale, bias)

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        return cls(tensors["weight"], tensors["scale"], tensors.get("bias"))

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = as_matrix(x, self.in_features)
        if x2.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
        else:
            out = F.linear(x2, self.weight.to(x2.dtype)) * self.scale
        return self._finish(out, lead, x.dtype)

"""Int8 weight-only linear: per-channel symmetric int8 weights, bf16 activations.

On CPU, for few rows (decode), the matmul is quantserve's own kernel
(`quantizers/kernels`; torch's `_weight_int8pack_mm` where it cannot be built),
which reads the int8 weight directly (a quarter of the float32 bytes) and is
2-7x faster than a bfloat16 matmul at one row. Its cost grows linearly with the
rows, though: from `kernels.int8_kernel_rows()` rows on (256 with AMX, else 32;
long prompts' prefill) casting the int8 weight to bfloat16 in row chunks for a
bfloat16 matmul is faster (bench/kernels_bench.py), so that path is taken
there. Both give the same result up to bfloat16 rounding. On CUDA the cast +
matmul is always used, as in gpt-fast, where the compiled decode step may fuse
the cast into the matmul's read (unmeasured here); whether torch's
`_weight_int8pack_mm` has a faster CUDA kernel is timed by bench/gpu_check.py,
which has not run on a GPU yet.
"""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers import kernels
from quantizers.primitives import quantize_per_channel_symmetric
from quantizers.runtime.base import (
    COMPUTE_DTYPE,
    QuantizedLinear,
    as_matrix,
    check_int8_per_channel,
    kernel_tensor,
)
from quantizers.runtime.embedding import Int8Embedding

# From kernels.int8_kernel_rows() rows on, the weight is cast to bfloat16 per
# chunk of output rows (so the copy of a chunk stays in cache) for a bf16 matmul.
DEQUANT_CHUNK = 2048


def dequantized_matmul(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x @ (weight * scale).T with the int8 weight cast chunk by chunk."""
    if weight.shape[0] <= DEQUANT_CHUNK:
        return F.linear(x, weight.to(x.dtype)) * scale
    parts = [
        F.linear(x, weight[i : i + DEQUANT_CHUNK].to(x.dtype)) * scale[i : i + DEQUANT_CHUNK]
        for i in range(0, weight.shape[0], DEQUANT_CHUNK)
    ]
    return torch.cat(parts, dim=1)


class Int8WeightOnlyLinear(QuantizedLinear):
    """y = x @ (q * scale).T + bias with q int8 [N, K] and scale [N]."""

    bits = 8

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", kernel_tensor(weight.to(torch.int8)))
        self.register_buffer("scale", kernel_tensor(scale.detach().to(COMPUTE_DTYPE)))

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
        check_int8_per_channel(q, scale, zero, group_size, "int8 weight-only")
        return cls(q, scale, bias)

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        return cls(tensors["weight"], tensors["scale"], tensors.get("bias"))

    def as_embedding(
        self, padding_idx: int | None = None, multiplier: float = 1.0
    ) -> Int8Embedding:
        """An embedding reading the same codes and scales (for a tied lm_head)."""
        return Int8Embedding(self.weight, self.scale, padding_idx, multiplier)

    @classmethod
    def tied_to(cls, embedding: Int8Embedding) -> Self:
        """An lm_head sharing the codes and scales of a quantised embedding."""
        return cls(embedding.weight, embedding.scale, None)

    def dequantized_weight(self) -> Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = as_matrix(x, self.in_features)
        if x2.device.type == "cpu" and x2.shape[0] < kernels.int8_kernel_rows():
            out = kernels.int8_linear(x2, self.weight, self.scale)
        else:
            out = dequantized_matmul(x2, self.weight, self.scale)
        return self._finish(out, lead, x.dtype)

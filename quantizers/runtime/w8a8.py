"""W8A8 linear: int8 weights and int8 activations, int32 accumulation.

Weights are symmetric per output channel. Activations are quantised either
dynamically — one symmetric scale per token, computed at run time, robust to
outlier tokens — or statically with one calibrated (scale, zero point) for the
whole tensor, which costs nothing at run time but is hurt by outlier channels
(what SmoothQuant fixes). The integer matmul is `torch._int_mm`; for the
static zero point, x = (qx - z) * sx gives
``x @ W.T = sx * sw * (qx @ qW.T - z * rowsum(qW))``.
"""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers.primitives import (
    asymmetric_params,
    quantize_per_channel_symmetric,
    quantize_per_token_symmetric,
)
from quantizers.runtime.base import (
    QuantizedLinear,
    as_matrix,
    check_int8_per_channel,
    kernel_tensor,
)

# cuBLASLt's int8 matmul needs more than 16 rows; smaller batches are padded.
_CUDA_MIN_ROWS = 17


def static_activation_params(low: float, high: float) -> tuple[Tensor, Tensor]:
    """Per-tensor int8 (scale, zero point) covering the calibrated range [low, high]."""
    scale, zero = asymmetric_params(torch.tensor(low), torch.tensor(high), bits=8)
    return scale.float(), (zero - 128).to(torch.int32)


def quantize_static(x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """x -> int8 codes with a fixed per-tensor scale and zero point."""
    return torch.div(x.float(), scale).round_().add_(zero).clamp_(-128, 127).to(torch.int8)


def int_matmul(qx: Tensor, weight: Tensor) -> Tensor:
    """int8 [M, K] @ int8 [N, K].T -> int32 [M, N] with torch._int_mm."""
    rows = qx.shape[0]
    if qx.device.type == "cuda" and rows < _CUDA_MIN_ROWS:
        qx = F.pad(qx, (0, 0, 0, _CUDA_MIN_ROWS - rows))
    return torch._int_mm(qx, weight.t())[:rows]


class W8A8Linear(QuantizedLinear):
    """int8 x int8 linear; static when input_scale is set, else dynamic per token."""

    bits = 8

    def __init__(
        self,
        weight: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        input_scale: Tensor | None = None,
        input_zero: Tensor | None = None,
    ) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", kernel_tensor(weight.to(torch.int8)))
        self.register_buffer("weight_scale", weight_scale.detach().float().contiguous())
        static = input_scale is not None
        if static and input_zero is None:
            input_zero = torch.tensor(0)
        device = self.weight.device
        self.register_buffer(
            "input_scale", input_scale.float().reshape(()).to(device) if static else None
        )
        self.register_buffer(
            "input_zero", input_zero.to(torch.int32).reshape(()).to(device) if static else None
        )
        # Derived, so not stored in artifacts; needed only for a static zero point.
        self.register_buffer(
            "weight_row_sum",
            self.weight.sum(dim=1, dtype=torch.int32) if static else None,
            persistent=False,
        )

    @property
    def static(self) -> bool:
        return self.input_scale is not None

    @classmethod
    def from_float(
        cls, linear: nn.Linear, input_range: tuple[float, float] | None = None
    ) -> Self:
        """Quantise the weight per channel; static activations when input_range is given."""
        q, scale = quantize_per_channel_symmetric(linear.weight, bits=8)
        if input_range is None:
            return cls(q, scale, linear.bias)
        input_scale, input_zero = static_activation_params(*input_range)
        return cls(q, scale, linear.bias, input_scale, input_zero)

    @classmethod
    def from_quantized(
        cls,
        q: Tensor,
        scale: Tensor,
        zero: Tensor | None = None,
        group_size: int | None = None,
        bias: Tensor | None = None,
        input_scale: Tensor | None = None,
        input_zero: Tensor | None = None,
    ) -> Self:
        """From int8 codes [N, K] and per-channel scales [N], plus optional static input params."""
        check_int8_per_channel(q, scale, zero, group_size, "W8A8")
        return cls(q, scale, bias, input_scale, input_zero)

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        return cls(
            tensors["weight"],
            tensors["weight_scale"],
            tensors.get("bias"),
            tensors.get("input_scale"),
            tensors.get("input_zero"),
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "activations": "static" if self.static else "dynamic"}

    def dequantized_weight(self) -> Tensor:
        """The weight only: activation rounding passes gradients straight through."""
        return self.weight.float() * self.weight_scale.float().reshape(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = as_matrix(x, self.in_features)
        if self.static:
            qx = quantize_static(x2, self.input_scale, self.input_zero)
            acc = int_matmul(qx, self.weight) - self.input_zero * self.weight_row_sum
            out = acc.float() * (self.input_scale * self.weight_scale)
        else:
            qx, x_scale = quantize_per_token_symmetric(x2)
            out = int_matmul(qx, self.weight).float() * x_scale * self.weight_scale
        return self._finish(out.to(x2.dtype), lead, x.dtype)

"""Int4 group-wise weight-only linear on torch's int4 kernels.

Weights are asymmetric 4-bit codes with a (scale, zero point) per group of
`group_size` input channels, packed in the layout of the int4 matmul kernel of
the module's device (`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm`
on CUDA). Input channels are zero-padded up to a multiple of the group size
(SmolLM2's 576 with groups of 128) and output channels up to a multiple of 16
(a CPU kernel requirement); activations are padded to match and the extra
outputs dropped.
"""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers.packing import (
    INT4_N_MULTIPLE,
    int4_matmul,
    kernel_scales_and_zeros,
    pack_int4,
    split_scales_and_zeros,
    unpack_int4,
)
from quantizers.primitives import pad_to_multiple, quantize_per_group_asymmetric
from quantizers.runtime.base import COMPUTE_DTYPE, QuantizedLinear, as_matrix

GROUP_SIZES = (32, 64, 128)


class Int4WeightOnlyLinear(QuantizedLinear):
    """y = x @ dequant(q, scale, zero).T + bias, dequantised inside the kernel."""

    bits = 4

    def __init__(
        self,
        packed: Tensor,
        scales_and_zeros: Tensor,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: Tensor | None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.padded_in = scales_and_zeros.shape[0] * group_size
        self.padded_out = scales_and_zeros.shape[1]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(COMPUTE_DTYPE).contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128) -> Self:
        """Round-to-nearest asymmetric 4-bit quantisation, K padded to the group size.

        Zero points are floats: the kernel's per-group offset is a float anyway,
        and an exact min/max grid loses less than a rounded zero point.
        """
        weight = pad_to_multiple(linear.weight.detach().float(), group_size, dim=1)
        q, scale, zero = quantize_per_group_asymmetric(weight, 4, group_size, integer_zero=False)
        return cls.from_quantized(q, scale, zero, group_size, linear.bias, linear.in_features)

    @classmethod
    def from_quantized(
        cls,
        q: Tensor,
        scale: Tensor,
        zero: Tensor | None,
        group_size: int,
        bias: Tensor | None = None,
        in_features: int | None = None,
        device: torch.device | str | None = None,
    ) -> Self:
        """From codes q uint8 [N, Kp] (0..15), scale and zero [N, Kp // g].

        Kp must be a multiple of group_size; when the layer's real input size is
        smaller (padded weights), pass it as `in_features`.
        """
        if zero is None:
            raise ValueError("int4 weight-only is asymmetric: a zero point is required")
        n, kp = q.shape
        if kp % group_size or scale.shape != (n, kp // group_size) or zero.shape != scale.shape:
            raise ValueError(
                f"codes {tuple(q.shape)} and scales {tuple(scale.shape)} do not match "
                f"group_size {group_size}"
            )
        target = torch.device(device) if device is not None else q.device
        extra = (-n) % INT4_N_MULTIPLE
        if extra:
            q = F.pad(q, (0, 0, 0, extra))
            scale = F.pad(scale, (0, 0, 0, extra), value=1.0)
            zero = F.pad(zero, (0, 0, 0, extra))
        return cls(
            pack_int4(q, target),
            kernel_scales_and_zeros(scale, zero, COMPUTE_DTYPE).to(target),
            group_size,
            in_features if in_features is not None else kp,
            n,
            None if bias is None else bias.to(target),
        )

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        return cls(
            tensors["packed"],
            tensors["scales_and_zeros"],
            int(meta["group_size"]),
            int(meta["in_features"]),
            int(meta["out_features"]),
            tensors.get("bias"),
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "group_size": self.group_size,
            "layout": self.packed.device.type,
        }

    def unpacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q uint8, scale, zero) of the real [N, Kp] layer, read back from the packing."""
        q = unpack_int4(self.packed, self.padded_out, self.padded_in, self.group_size)
        scale, zero = split_scales_and_zeros(self.scales_and_zeros.cpu())
        n = self.out_features
        return q[:n], scale[:n], zero[:n]

    def repacked(self, device: torch.device | str) -> Self:
        """The same layer packed for another device's kernel (layouts differ)."""
        q, scale, zero = self.unpacked()
        return self.from_quantized(
            q, scale, zero, self.group_size, self.bias, self.in_features, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = as_matrix(x, self.in_features)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        out = int4_matmul(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.padded_out != self.out_features:
            out = out[:, : self.out_features]
        return self._finish(out, lead, x.dtype)

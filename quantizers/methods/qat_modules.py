"""The training form of a quantised layer: fake quantisation with straight-through rounding.

A `FakeQuantLinear` computes the weight the kernel would serve,
``(clamp(round((w - offset) / scale) + mid, low, high) - mid) * scale + offset``
per group of input channels, from a latent float weight `w` and the group's
scale and offset, with the rounding's gradient passed straight through (so the
scale's gradient is LSQ's learned step size). int4 groups are the runtime's
(mid 8, codes 0..15, bf16 scale and offset); int8 is one symmetric group per
output channel (mid 0, codes -127..127, no offset). Scale and offset are
rounded to bfloat16 in the forward as the kernels store them, so what is
trained is what is served. `freeze()` fixes the codes and drops the latent
weight, after which only scale and offset move (EfficientQAT's end-to-end
phase). `teacher` switches the layer to the float weight it was made from, so
the float model's outputs come from the same modules without a second copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers.methods.column_grid import KERNEL_PARAM_DTYPE
from quantizers.packing import INT4_MID
from quantizers.primitives import pad_to_multiple, symmetric_qmax
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear


def _ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _as_kernel_param(x: Tensor) -> Tensor:
    """x rounded to the kernel's parameter dtype, gradient passed straight through."""
    return x + (x.to(KERNEL_PARAM_DTYPE).float() - x).detach()


class FakeQuantLinear(nn.Module):
    """One quantised layer in training: scale and offset [N, G], and either a
    latent weight [N, Kp] (codes follow it) or fixed codes."""

    def __init__(
        self,
        float_weight: Tensor,
        scale: Tensor,
        offset: Tensor,
        group_size: int,
        bias: Tensor | None,
        int8: bool,
        latent: Tensor | None,
        codes: Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = float_weight.shape
        self.group_size = group_size
        self.int8 = int8
        self.mid, self.low, self.high = (
            (0, -symmetric_qmax(8), symmetric_qmax(8)) if int8 else (INT4_MID, 0, 2 * INT4_MID - 1)
        )
        self.scale = nn.Parameter(scale.float().clone())
        self.offset = nn.Parameter(offset.float().clone(), requires_grad=not int8)
        self.latent = None if latent is None else nn.Parameter(latent.float().clone())
        # Fixed codes minus the grid's middle, in bfloat16 (exact for integers
        # up to 256): half the bytes of float32, and the tensor autograd keeps
        # for the scales' gradient without a float copy of its own.
        self.codes = None if codes is None else (codes.float() - self.mid).to(torch.bfloat16)
        self.bias = bias
        # The float model's own tensor (not a parameter or buffer: never
        # trained, copied or saved), for teacher passes.
        self.float_weight = float_weight
        self.teacher = False

    @classmethod
    def from_runtime(
        cls, module: nn.Module, float_weight: Tensor, latent: str | None
    ) -> FakeQuantLinear:
        """From an installed int4/int8 runtime module and the float weight it came from.

        latent None fixes the module's codes. "float" starts a latent weight at
        the float weight (right for starts that round to nearest: the codes
        come out the same and the latent keeps where each weight sits between
        grid points); "start" at the dequantised start, which reproduces codes
        chosen by error feedback (GPTQ).
        """
        if isinstance(module, Int4WeightOnlyLinear):
            q, scale, zero = module.unpacked()
            group, int8 = module.group_size, False
            offset = (INT4_MID - zero) * scale
        elif isinstance(module, Int8WeightOnlyLinear):
            q, scale = module.weight, module.scale.float()[:, None]
            group, int8 = q.shape[1], True
            offset = torch.zeros_like(scale)
        else:
            raise TypeError(f"no training form for {type(module).__name__}")
        weight = None
        if latent == "float":
            weight = pad_to_multiple(float_weight.detach().float(), group, dim=1)
        elif latent == "start":
            n, kp = q.shape
            mid = 0 if int8 else INT4_MID
            groups = (q.float().reshape(n, -1, group) - mid) * scale[..., None] + offset[..., None]
            weight = groups.reshape(n, kp)
        return cls(
            float_weight,
            scale,
            offset,
            group,
            module.bias,
            int8,
            weight,
            q if weight is None else None,
        )

    def _grid(self) -> tuple[Tensor, Tensor]:
        return _as_kernel_param(self.scale)[..., None], _as_kernel_param(self.offset)[..., None]

    def _centered_codes(self, scale: Tensor, offset: Tensor) -> Tensor:
        """Codes minus the middle, [N, G, g], rounding the latent straight-through."""
        n, g = scale.shape[0], scale.shape[1]
        if self.latent is None:
            assert self.codes is not None
            return self.codes.reshape(n, g, self.group_size)
        w = self.latent.reshape(n, g, self.group_size)
        q = (_ste_round((w - offset) / scale) + self.mid).clamp(self.low, self.high)
        return q - self.mid

    def quantized_weight(self) -> Tensor:
        """The served weight [N, K] as a differentiable function of the trained tensors."""
        scale, offset = self._grid()
        w = self._centered_codes(scale, offset) * scale + offset
        return w.reshape(w.shape[0], -1)[:, : self.in_features]

    def freeze(self) -> None:
        """Fix the codes at their current rounding; the latent weight is released."""
        if self.latent is None:
            return
        with torch.no_grad():
            self.codes = self._centered_codes(*self._grid()).reshape(self.scale.shape[0], -1)
            self.codes = self.codes.to(torch.bfloat16)
        self.latent = None

    def forward(self, x: Tensor) -> Tensor:
        weight = self.float_weight if self.teacher else self.quantized_weight()
        return F.linear(x, weight, self.bias)

    def to_runtime(self) -> nn.Module:
        """The runtime module serving exactly the current quantised weight."""
        self.freeze()
        assert self.codes is not None
        with torch.no_grad():
            scale, offset = (t[..., 0] for t in self._grid())
        codes = self.codes.float() + self.mid
        if self.int8:
            return Int8WeightOnlyLinear.from_quantized(
                codes.to(torch.int8), scale[:, 0], None, None, self.bias
            )
        zero = INT4_MID - offset / scale
        return Int4WeightOnlyLinear.from_quantized(
            codes.to(torch.uint8), scale, zero, self.group_size, self.bias, self.in_features
        )

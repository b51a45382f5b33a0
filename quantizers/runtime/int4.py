"""Int4 group-wise weight-only linear on torch's int4 kernels.

Weights are asymmetric 4-bit codes with a (scale, zero point) per group of
`group_size` input channels, packed in the layout of the int4 matmul kernel of
the module's device (`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm`
on CUDA). On CPU, every input runs quantserve's own kernel, which reads that
same packing (`quantizers/kernels`), where the CPU has AVX512-VNNI: on
SmolLM2's shapes it is as fast as torch's or faster at every row count
measured (1.7-4.2x at 128 and 512 rows, bench/kernels_bench.py), and one
kernel for every row count keeps a sequence's numbers independent of its
batch and of packed prefill.
The kernels need the input size to be a multiple of the group size.
When it is not (SmolLM2's 576 with groups of 128), the whole groups are one
packed matrix and the last, partial group a second one whose kernel group is
the narrowest kernel group size that holds it (64 for 576 = 4 x 128 + 64): both
kernels run and their outputs are summed. The partial group keeps its single
(scale, zero) pair, so the numbers are those of zero-padding the group, but
the padded columns are not stored (zero-padding 576 to 640 would add 11% to the
codes). Output channels are padded to a multiple of 16 (a CPU kernel
requirement) and the extra outputs dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers import kernels
from quantizers.packing import (
    INT4_MID,
    INT4_N_MULTIPLE,
    int4_matmul,
    kernel_scales_and_zeros,
    pack_int4,
    split_scales_and_zeros,
    unpack_int4,
)
from quantizers.primitives import pad_to_multiple, quantize_per_group_asymmetric
from quantizers.runtime.base import COMPUTE_DTYPE, QuantizedLinear, as_matrix, kernel_tensor

GROUP_SIZES = (32, 64, 128)


def kernel_layout(device: torch.device) -> str:
    """Which int4 kernel, hence which packed layout, serves `device`."""
    return "cuda" if device.type == "cuda" else "cpu"


def tail_width(in_features: int, group_size: int) -> int:
    """Stored width of the partial last group: 0 when group_size divides
    in_features, else the narrowest kernel group size that holds the rest."""
    rest = in_features % group_size
    if rest == 0:
        return 0
    return min(size for size in (*GROUP_SIZES, group_size) if size >= rest)


class Int4WeightOnlyLinear(QuantizedLinear):
    """y = x @ dequant(q, scale, zero).T + bias, dequantised inside the kernel.

    `packed` / `scales_and_zeros` hold the whole groups (None when the layer is
    narrower than one group), `tail_packed` / `tail_scales_and_zeros` the
    partial last group (None when group_size divides in_features).
    """

    bits = 4

    def __init__(
        self,
        packed: Tensor | None,
        scales_and_zeros: Tensor | None,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: Tensor | None,
        tail_packed: Tensor | None = None,
        tail_scales_and_zeros: Tensor | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if (packed is None) != (scales_and_zeros is None) or (
            (tail_packed is None) != (tail_scales_and_zeros is None)
        ):
            raise ValueError("packed weights and their scales come in pairs")
        if scales_and_zeros is None and tail_scales_and_zeros is None:
            raise ValueError("an int4 layer needs packed weights")
        self.group_size = group_size
        self.main_in = 0 if scales_and_zeros is None else scales_and_zeros.shape[0] * group_size
        self.tail_in = 0 if tail_packed is None else tail_width(in_features, group_size)
        self.padded_in = self.main_in + self.tail_in
        self.padded_out = next(
            sz.shape[1] for sz in (scales_and_zeros, tail_scales_and_zeros) if sz is not None
        )
        self.register_buffer("packed", _kernel_ready(packed))
        self.register_buffer("scales_and_zeros", _kernel_ready(scales_and_zeros))
        self.register_buffer("tail_packed", _kernel_ready(tail_packed))
        self.register_buffer("tail_scales_and_zeros", _kernel_ready(tail_scales_and_zeros))

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128) -> Self:
        """Round-to-nearest asymmetric 4-bit quantisation, K padded to the group size.

        Zero points are floats: the kernel's per-group offset is a float anyway,
        and an exact min/max grid loses less than a rounded zero point.
        """
        weight = pad_to_multiple(linear.weight.detach().float(), group_size, dim=1)
        q, scale, zero = quantize_per_group_asymmetric(weight, 4, group_size, integer_zero=False)
        del weight
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
    ) -> Self:
        """From codes q uint8 [N, Kp] (0..15), scale and zero [N, Kp // g].

        Kp must be a multiple of group_size; when the layer's real input size is
        smaller (padded weights), pass it as `in_features`: codes beyond the
        partial last group's stored width are then dropped.
        """
        if zero is None:
            raise ValueError("int4 weight-only is asymmetric: a zero point is required")
        n, kp = q.shape
        if kp % group_size or scale.shape != (n, kp // group_size) or zero.shape != scale.shape:
            raise ValueError(
                f"codes {tuple(q.shape)} and scales {tuple(scale.shape)} do not match "
                f"group_size {group_size}"
            )
        in_features = kp if in_features is None else in_features
        if not 0 < in_features <= kp:
            raise ValueError(f"in_features {in_features} must be in 1..{kp}")
        target = q.device
        extra = (-n) % INT4_N_MULTIPLE
        if extra:
            q = F.pad(q, (0, 0, 0, extra))
            scale = F.pad(scale, (0, 0, 0, extra), value=1.0)
            zero = F.pad(zero, (0, 0, 0, extra))
        whole = in_features // group_size
        main_in = whole * group_size
        tail_in = tail_width(in_features, group_size)

        def pack(columns: slice, groups: slice) -> tuple[Tensor, Tensor]:
            return (
                pack_int4(q[:, columns].contiguous(), target),
                kernel_scales_and_zeros(scale[:, groups], zero[:, groups], COMPUTE_DTYPE).to(
                    target
                ),
            )

        main = pack(slice(0, main_in), slice(0, whole)) if whole else (None, None)
        tail = (
            pack(slice(main_in, main_in + tail_in), slice(whole, whole + 1))
            if tail_in
            else (None, None)
        )
        return cls(
            *main,
            group_size,
            in_features,
            n,
            None if bias is None else bias.to(target),
            *tail,
        )

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        return cls(
            tensors.get("packed"),
            tensors.get("scales_and_zeros"),
            int(meta["group_size"]),
            int(meta["in_features"]),
            int(meta["out_features"]),
            tensors.get("bias"),
            tensors.get("tail_packed"),
            tensors.get("tail_scales_and_zeros"),
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "group_size": self.group_size}

    @property
    def layout(self) -> str:
        """The kernel layout the codes are packed in now."""
        packed = self.packed if self.packed is not None else self.tail_packed
        return kernel_layout(packed.device)

    def _codes(self) -> dict[str, Tensor]:
        """Each packed part's uint8 codes [padded N, width], read back on its device."""
        parts = {
            "packed": (self.packed, self.main_in, self.group_size),
            "tail_packed": (self.tail_packed, self.tail_in, self.tail_in),
        }
        return {
            name: unpack_int4(packed, self.padded_out, width, group)
            for name, (packed, width, group) in parts.items()
            if packed is not None
        }

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        """Move like any module, repacking the codes when the kernel layout changes."""
        packed = self.packed if self.packed is not None else self.tail_packed
        target = fn(torch.empty(0, device=packed.device)).device
        if kernel_layout(target) == self.layout:
            return super()._apply(fn, recurse)
        codes = self._codes()
        super()._apply(fn, recurse)
        for name, part in codes.items():
            self._buffers[name] = _kernel_ready(fn(pack_int4(part, target)))
        return self

    def state_tensors(self) -> dict[str, Tensor]:
        """The CPU layout, whatever the device: artifacts load anywhere."""
        tensors = super().state_tensors()
        if self.layout != "cpu":
            cpu = torch.device("cpu")
            tensors.update({n: pack_int4(q, cpu) for n, q in self._codes().items()})
        return tensors

    def unpacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q uint8 [N, Kp], scale, zero [N, Kp // g]) read back from the packing,
        Kp being in_features rounded up to the group size.

        Codes of input channels past the stored ones (the padding of a partial
        last group) are those a zero weight rounds to on that group's grid.
        """
        scales, zeros = [], []
        for scales_and_zeros in (self.scales_and_zeros, self.tail_scales_and_zeros):
            if scales_and_zeros is not None:
                scale, zero = split_scales_and_zeros(scales_and_zeros)
                scales.append(scale)
                zeros.append(zero)
        q = torch.cat(list(self._codes().values()), 1)
        scale, zero = torch.cat(scales, 1), torch.cat(zeros, 1)
        missing = scale.shape[1] * self.group_size - q.shape[1]
        if missing:
            fill = zero[:, -1:].round().clamp(0, 2 * INT4_MID - 1).to(torch.uint8)
            q = torch.cat([q, fill.expand(-1, missing)], 1)
        n = self.out_features
        return q[:n], scale[:n], zero[:n]

    def dequantized_weight(self) -> Tensor:
        q, scale, zero = self.unpacked()
        width = self.group_size
        w = (q.float() - zero.repeat_interleave(width, 1)) * scale.repeat_interleave(width, 1)
        return w[:, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = as_matrix(x, self.in_features)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        # On CPU quantserve's kernel where it reads this packing (column slices
        # as they are); torch's wants contiguous inputs.
        own = x2.device.type == "cpu" and kernels.own_int4(
            self.packed if self.packed is not None else self.tail_packed
        )
        matmul = torch.ops.quantserve.int4_linear if own else int4_matmul

        def part(columns: Tensor) -> Tensor:
            return columns if own else columns.contiguous()

        out = None
        if self.packed is not None:
            head = x2 if self.tail_packed is None else part(x2[:, : self.main_in])
            out = matmul(head, self.packed, self.group_size, self.scales_and_zeros)
        if self.tail_packed is not None:
            tail = matmul(
                part(x2[:, self.main_in :]),
                self.tail_packed,
                self.tail_in,
                self.tail_scales_and_zeros,
            )
            out = tail if out is None else out.add_(tail)
        if self.padded_out != self.out_features:
            out = out[:, : self.out_features]
        return self._finish(out, lead, x.dtype)


def _kernel_ready(tensor: Tensor | None) -> Tensor | None:
    """Packed codes (integer, device-specific dtype) as they are, scales in the
    compute dtype; both aligned."""
    if tensor is None:
        return None
    return kernel_tensor(tensor.to(COMPUTE_DTYPE) if tensor.is_floating_point() else tensor)

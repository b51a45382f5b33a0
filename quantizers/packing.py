"""Int4 packing into the layouts torch's int4 matmul kernels read.

The kernels compute ``w = (q - 8) * scale + offset`` per group, with q in
0..15, from a device-specific packed tensor and a [K // g, N, 2] tensor of
(scale, offset). Our primitives express ``w = (q - zero) * scale``, so the
offset is ``(8 - zero) * scale``. The packed layouts differ between CPU and
CUDA and are opaque; `unpack_int4` recovers the codes by running the kernel on
an identity matrix, so an artifact packed on one device can be repacked for
another without a second copy of the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_MID = 8
# The CPU kernel needs N to be a multiple of this; the runtime pads N.
INT4_N_MULTIPLE = 16


def kernel_scales_and_zeros(scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, G] scale and zero point -> the kernels' [G, N, 2] (scale, offset)."""
    offset = (INT4_MID - zero.float()) * scale.float()
    return torch.stack([scale.float().t(), offset.t()], dim=-1).to(dtype).contiguous()


def split_scales_and_zeros(scales_and_zeros: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of kernel_scales_and_zeros, as float32 [N, G] scale and zero point."""
    scale = scales_and_zeros[..., 0].float().t()
    offset = scales_and_zeros[..., 1].float().t()
    return scale.contiguous(), (INT4_MID - offset / scale).contiguous()


def pack_nibbles(q: Tensor) -> Tensor:
    """[N, K] codes in 0..15 -> [N, K // 2] uint8, even column in the high nibble
    (the order torch's CUDA int4 packer expects)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4 | q[:, 1::2]).contiguous()


def cuda_inner_k_tiles(k: int) -> int:
    """Largest inner-K tiling the CUDA packer accepts for this K."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"K={k} must be a multiple of 32 for the CUDA int4 kernel")


def pack_int4(q: Tensor, device: torch.device) -> Tensor:
    """[N, K] uint8 codes -> the packed weight of the int4 kernel on `device`."""
    if device.type == "cuda":
        nibbles = pack_nibbles(q).to(device)
        return torch.ops.aten._convert_weight_to_int4pack(nibbles, cuda_inner_k_tiles(q.shape[1]))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).cpu(), 2)
    return packed.to(device)


def int4_matmul(x: Tensor, packed: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    """x [M, K] @ dequant(packed).T with the int4 kernel of x's device."""
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def unpack_int4(packed: Tensor, n: int, k: int, group_size: int) -> Tensor:
    """Recover the [N, K] uint8 codes from a packed weight on its own device.

    Multiplying the identity by the packed weight with scale 1 and offset 0
    yields q - 8 exactly (small integers are exact in bfloat16)."""
    eye = torch.eye(k, dtype=torch.bfloat16, device=packed.device)
    ones = torch.zeros(k // group_size, n, 2, dtype=torch.bfloat16, device=packed.device)
    ones[..., 0] = 1.0
    codes = int4_matmul(eye, packed, group_size, ones)
    return (codes.t().round() + INT4_MID).to(torch.uint8)

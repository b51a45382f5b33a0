"""Runtime modules follow the device they are moved to, checked without a GPU.

Moving an int4 module to CUDA must repack its codes into the CUDA kernel's
layout: under FakeTensorMode a fake `cuda:0` device runs torch's own shape
checks of the CUDA int4 kernels (`_convert_weight_to_int4pack`,
`_weight_int4pack_mm`), so a wrong layout, group size or scale shape fails
here. Reading codes back from a fake CUDA packing cannot run on a CPU-only
build (it indexes a CUDA tensor), so the move back to the CPU and the numbers
are checked on a real GPU, by the CUDA tests of test_weight_only_runtime.py
and by bench/gpu_check.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from quantizers.runtime import BnbInt8Linear, Int4WeightOnlyLinear
from tests.helpers.virtual_device import VIRTUAL, VirtualDeviceMode, real, to_virtual

CUDA = torch.device("cuda", 0)  # an index: a bare "cuda" asks for a current device


def int4_module() -> Int4WeightOnlyLinear:
    """96 inputs in groups of 64: one whole group and a partial one (the tail)."""
    torch.manual_seed(0)
    return Int4WeightOnlyLinear.from_float(nn.Linear(96, 40), group_size=64)


def test_int4_moved_to_cuda_is_packed_for_the_cuda_kernel() -> None:
    module = int4_module()
    with FakeTensorMode(allow_non_fake_inputs=True):
        module.to(CUDA)
        assert module.layout == "cuda"
        assert {t.device for t in module.buffers()} == {CUDA}
        # [N / 8, K / (tiles * 16), 32, tiles / 2] int32: the CUDA layout
        assert module.packed.shape == (48 // 8, 1, 32, 2)
        assert module.tail_packed.shape == (48 // 8, 1, 32, 1)
        x = torch.randn(3, 64, dtype=torch.bfloat16, device=CUDA)
        head = torch.ops.aten._weight_int4pack_mm(x, module.packed, 64, module.scales_and_zeros)
        x_tail = torch.randn(3, 32, dtype=torch.bfloat16, device=CUDA)
        tail = torch.ops.aten._weight_int4pack_mm(
            x_tail, module.tail_packed, 32, module.tail_scales_and_zeros
        )
        assert head.shape == tail.shape == (3, module.padded_out)


def test_int4_move_without_layout_change_keeps_the_codes() -> None:
    module = int4_module()
    x = torch.randn(3, 96)
    expected = module(x)
    with VirtualDeviceMode():
        module._apply(to_virtual)  # another device, served by the CPU layout
        assert module.packed.device == VIRTUAL and module.layout == "cpu"
        assert torch.equal(real(module(to_virtual(x))), expected)


def test_bnb_int8_side_tensors_follow_a_move() -> None:
    torch.manual_seed(0)
    module = BnbInt8Linear.from_float(nn.Linear(64, 32))
    x = torch.randn(2, 64)
    expected = module(x)  # bitsandbytes moves the row scales into its matmul state here
    module._apply(torch.clone)  # what a move does: new tensors for every parameter
    inner = module.inner
    assert inner.state.CB.data_ptr() == inner.weight.data_ptr()
    assert torch.equal(module(x), expected)

"""quantserve's own CPU kernels (quantizers/kernels): real low-bit matmuls
against float, row results independent of the batch, and the fallback to
torch's kernels when the library cannot be built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from quantizers import kernels
from quantizers.primitives import (
    dequantize_per_channel,
    dequantize_per_group,
    quantize_per_channel_symmetric,
    quantize_per_group_asymmetric,
)
from quantizers.runtime import Int4WeightOnlyLinear, Int8WeightOnlyLinear

REPO = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")
needs_int4 = pytest.mark.skipif(
    "vnni" not in kernels.int8_paths(), reason="CPU without AVX512-VNNI"
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def weight(n: int, k: int) -> torch.Tensor:
    torch.manual_seed(n + 3 * k)
    w = torch.randn(n, k)
    w[:, :3] *= 8  # outlier columns, so a wrong scale shows
    return w


@needs_kernels
@pytest.mark.parametrize(("k", "n"), [(576, 960), (100, 37), (1536, 64), (24, 5)])
@pytest.mark.parametrize("rows", [1, 3, 6, 17])
def test_int8_kernel_matches_dequantised_float(k: int, n: int, rows: int) -> None:
    q, scale = quantize_per_channel_symmetric(weight(n, k))
    x = torch.randn(rows, k).to(torch.bfloat16)
    out = torch.ops.quantserve.int8_linear(x, q, scale.to(torch.bfloat16))
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    exact = x.float() @ dequantize_per_channel(q, scale.to(torch.bfloat16).float()).t()
    # float32 sums, one bf16 rounding of the output: well under 1%
    assert relative_error(out, exact) < 0.005


@needs_kernels
@pytest.mark.parametrize("outlier", [1.0, 200.0])
def test_int8_kernels_quantised_inputs_cost_less_than_the_bf16_output(outlier: float) -> None:
    # x's rows become 15-bit codes: even a column 200x the others' scale adds
    # next to nothing to the bf16 rounding of the exact result
    q, scale = quantize_per_channel_symmetric(weight(300, 1536))
    scale = scale.to(torch.bfloat16)
    x = torch.randn(8, 1536)
    x[:, 5] *= outlier
    x = x.to(torch.bfloat16)
    exact = x.float() @ dequantize_per_channel(q, scale.float()).t()
    rounding = relative_error(exact.to(torch.bfloat16), exact)
    out = torch.ops.quantserve.int8_linear(x, q, scale)
    assert rounding < relative_error(out, exact) < 1.1 * rounding


@needs_kernels
@pytest.mark.parametrize(("k", "n"), [(576, 200), (100, 37), (1536, 64), (24, 5)])
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 17, 33])
def test_every_int8_path_gives_the_same_bits(k: int, n: int, rows: int) -> None:
    # integer sums are exact: scalar, AVX2, VNNI and AMX agree to the bit, so
    # the kernel may pick its path by row count without a row depending on it
    paths = kernels.int8_paths()
    assert paths[0] == "scalar"
    if kernels.isa() != "scalar":
        assert "avx2" in paths
    q, scale = quantize_per_channel_symmetric(weight(n, k))
    scale = scale.to(torch.bfloat16)
    x = torch.randn(rows, k).to(torch.bfloat16)
    outs = {}
    for path in paths:
        with kernels.int8_path(path):
            outs[path] = torch.ops.quantserve.int8_linear(x, q, scale)
    for path, out in outs.items():
        assert torch.equal(out, outs["scalar"]), path


@needs_kernels
def test_an_unknown_int8_path_is_refused() -> None:
    with pytest.raises(ValueError, match="'sse'"), kernels.int8_path("sse"):
        pass
    assert torch.ops.quantserve.set_int8_path(len(kernels.INT8_PATHS)) == -1
    assert kernels.int8_paths()[-1] == kernels.INT8_PATHS[torch.ops.quantserve.best_int8_path()]


# What a process capped by QUANTSERVE_INT8_PATH runs: its int8 paths' best,
# the kernel's rows, the path the C++ kernels hold, whether int4 runs own.
CAPPED = """
import torch
from quantizers import kernels
assert kernels.available()
held = int(torch.ops.quantserve.set_int8_path(0))
torch.ops.quantserve.set_int8_path(held)
packed = torch.zeros(64, 8, dtype=torch.uint8)
print(kernels.int8_paths()[-1], kernels.int8_kernel_rows(), held, kernels.own_int4(packed))
"""


@needs_kernels
def test_an_int8_path_cap_holds_the_whole_process_below_it() -> None:
    if "avx2" not in kernels.int8_paths():
        pytest.skip("CPU without AVX2")
    env = {**os.environ, "QUANTSERVE_INT8_PATH": "avx2"}
    run = subprocess.run(
        [sys.executable, "-c", CAPPED], env=env, cwd=REPO, capture_output=True, text=True,
        check=True, timeout=300,
    )
    best, rows, held, own_int4 = run.stdout.split()
    assert (best, rows, held) == ("avx2", "32", str(kernels.INT8_PATHS.index("avx2")))
    assert own_int4 == "False"  # int4's own kernel needs VNNI: torch's runs


def test_an_unknown_int8_path_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTSERVE_INT8_PATH", "fastest")
    with pytest.raises(ValueError, match="one of scalar, avx2, vnni, amx"):
        kernels._path_cap()
    monkeypatch.setenv("QUANTSERVE_INT8_PATH", "VNNI")
    assert kernels._path_cap() == kernels.INT8_PATHS.index("vnni")


@needs_kernels
def test_int8_kernel_rows_do_not_depend_on_the_batch() -> None:
    q, scale = quantize_per_channel_symmetric(weight(200, 576))
    scale = scale.to(torch.bfloat16)
    x = torch.randn(9, 576).to(torch.bfloat16)
    together = torch.ops.quantserve.int8_linear(x, q, scale)
    for i in range(9):
        alone = torch.ops.quantserve.int8_linear(x[i : i + 1].contiguous(), q, scale)
        assert torch.equal(alone[0], together[i])


@needs_int4
@pytest.mark.parametrize(("k", "n", "group_size"), [(512, 960, 128), (576, 192, 64), (64, 64, 32)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_int4_kernel_matches_dequantised_float(k: int, n: int, group_size: int, rows: int) -> None:
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight(n, k))
    module = Int4WeightOnlyLinear.from_float(linear, group_size)
    x = torch.randn(rows, k).to(torch.bfloat16)
    args = (module.packed, group_size, module.scales_and_zeros)
    out = torch.ops.quantserve.int4_linear(x, *args)
    q, scale, zero = quantize_per_group_asymmetric(linear.weight, 4, group_size, integer_zero=False)
    exact = x.float() @ dequantize_per_group(q, scale, zero, group_size).t()
    # bf16 scales and offsets as the kernel stores them, bf16 output: ~0.5%
    assert relative_error(out, exact) < 0.01
    stock = torch.ops.aten._weight_int4pack_mm_for_cpu(x, *args)
    assert relative_error(out, stock) < 0.01
    alone = torch.ops.quantserve.int4_linear(x[-1:].contiguous(), *args)
    assert torch.equal(alone[0], out[-1])


@needs_int4
@pytest.mark.parametrize(("k", "n", "group_size"), [(512, 960, 128), (576, 192, 64), (64, 64, 32)])
@pytest.mark.parametrize("rows", [1, 4, 16, 17, 31])
def test_every_int4_path_gives_the_same_bits(k: int, n: int, group_size: int, rows: int) -> None:
    # exact integer group sums and one float order: AMX (from 4 rows) and VNNI
    # agree to the bit, so a row's result does not depend on its batch size
    module = Int4WeightOnlyLinear.from_float(nn.Linear(k, n, bias=False), group_size)
    x = torch.randn(rows, k).to(torch.bfloat16)
    args = (module.packed, group_size, module.scales_and_zeros)
    outs = []
    for path in ("vnni", *[p for p in kernels.int8_paths() if p == "amx"]):
        with kernels.int8_path(path):
            outs.append(torch.ops.quantserve.int4_linear(x, *args))
    assert all(torch.equal(out, outs[0]) for out in outs)
    first = torch.ops.quantserve.int4_linear(x[:1].contiguous(), *args)
    assert torch.equal(first[0], outs[0][0])


@needs_kernels
def test_runtime_modules_run_the_own_kernels_at_decode_sizes() -> None:
    linear = nn.Linear(576, 192)
    x = torch.randn(4, 576).to(torch.bfloat16)
    int8 = Int8WeightOnlyLinear.from_float(linear)
    own = torch.ops.quantserve.int8_linear(x, int8.weight, int8.scale) + int8.bias
    assert torch.equal(int8(x), own)
    # 576 = 4 x 128 + 64: whole groups and a tail, read as column slices of x
    int4 = Int4WeightOnlyLinear.from_float(linear, 128)
    if kernels.own_int4(int4.packed):
        matmul = torch.ops.quantserve.int4_linear
    else:
        matmul = torch.ops.aten._weight_int4pack_mm_for_cpu
    head = matmul(x[:, :512].contiguous(), int4.packed, 128, int4.scales_and_zeros)
    tail = matmul(x[:, 512:].contiguous(), int4.tail_packed, 64, int4.tail_scales_and_zeros)
    assert torch.equal(int4(x), head + tail + int4.bias)


def test_no_compiler_falls_back_to_torchs_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("Error building extension 'quantserve_lowbit': g++ not found")

    monkeypatch.setattr(kernels, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="quantizers.kernels"):
        assert kernels._load() is False
    assert "g++ not found" in caplog.text and "stock kernels" in caplog.text
    monkeypatch.setenv("QUANTSERVE_KERNELS", "off")
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("built although disabled"))
    assert kernels._load() is False


def test_unavailable_kernels_compute_with_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "available", lambda: False)
    q, scale = quantize_per_channel_symmetric(weight(64, 128))
    scale = scale.to(torch.bfloat16)
    x = torch.randn(2, 128).to(torch.bfloat16)
    stock = torch.ops.aten._weight_int8pack_mm(x, q, scale)
    assert torch.equal(kernels.int8_linear(x, q, scale), stock)

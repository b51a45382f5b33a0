"""quantserve's own CPU kernels: low-bit matmuls at few rows, and a native decode step.

`lowbit.cpp` (weight-only int8, int4 and bf16 matmuls) and `decoder.cpp` (a
Llama-family decode step as one call, `torch.classes.quantserve.LlamaDecoder`)
are compiled with torch's C++ extension tooling on first use into
a cache folder (`QUANTSERVE_KERNEL_DIR`, default `~/.cache/quantserve/kernels`,
keyed by the source, torch version and Python), then loaded from there in later
processes. The build targets a generic CPU; the AVX-512 / AVX2 / scalar paths
are chosen at run time by CPU feature, so one build serves every CPU of an
architecture (the Docker image builds it once, at image build time, into
`QUANTSERVE_KERNEL_DIR`, and its runtime stage loads it without a compiler).

When no compiler is present, the build fails, or `QUANTSERVE_KERNELS=off`,
`available()` is False after one logged warning and the runtime modules keep
torch's stock kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).
The int4 kernel needs AVX512-VNNI (and weights in whole 64-channel blocks of
torch's CPU packing); elsewhere int4 stays on torch's kernel.

Both quantise activation rows to integer codes and sum products exactly, on
whichever path the CPU and the row count pick (`int8_path` holds one, for
tests and benchmarks): every path gives the same bits, so a sequence's logits
do not depend on its batch. `QUANTSERVE_INT8_PATH` (`amx`, `vnni`, `avx2`,
`scalar`) caps the paths a process takes, so that one CPU can run as one
without AMX, say, would (benchmarks); below `vnni` int4 keeps torch's kernel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "lowbit.cpp", HERE / "decoder.cpp")
HEADERS = (HERE / "lowbit.h",)
NAME = "quantserve_lowbit"
ISA_NAMES = ("scalar", "avx2", "avx512", "avx512-bf16")
# The int8 kernel's paths, by preference from last to first (see lowbit.cpp).
INT8_PATHS = ("scalar", "avx2", "vnni", "amx")
# Output channels per block of torch's CPU int4 packing, which the kernel reads.
INT4_BLOCK = 64

_lock = threading.Lock()
_state: dict[str, bool] = {}
_held: dict[str, int] = {}  # "path": the int8 path int8_path() holds
_paths: list[str] = []  # int8_paths(), found once (the CPU does not change)


def cache_dir() -> Path:
    """Where the compiled library lives: per source, torch and Python version."""
    root = os.environ.get("QUANTSERVE_KERNEL_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantserve" / "kernels"
    )
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    key = digest.hexdigest()[:12]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    return Path(root) / tag.replace("+", "_")


def _build() -> None:
    """Load the library, compiling it first when the cache has none; registers
    `torch.ops.quantserve`. A built library loads without a compiler or ninja
    (the Docker runtime image has neither)."""
    from torch.utils import cpp_extension

    folder = cache_dir()
    library = folder / f"{NAME}.so"
    if library.is_file():
        torch.ops.load_library(str(library))
        return
    folder.mkdir(parents=True, exist_ok=True)
    # pip's ninja sits beside the interpreter, which is not on PATH unless the
    # venv is activated; torch's build looks for it on PATH.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    cpp_extension.load(
        name=NAME,
        sources=[str(path) for path in SOURCES],
        build_directory=str(folder),
        # at::parallel_for is inlined into this library: without OpenMP it runs
        # on one thread. libgomp resolves to the copy torch has loaded already.
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def available() -> bool:
    """Whether quantserve's kernels are loaded (building them on the first call)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    if os.environ.get("QUANTSERVE_KERNELS", "on").lower() in ("0", "off", "false", "no"):
        return False
    try:
        _build()
    except Exception as exc:  # no compiler, no headers, a read-only cache: stock kernels
        log.warning(
            "quantserve CPU kernels unavailable (%s); using torch's stock kernels",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return False
    _register_fakes()
    cap = _path_cap()
    best = int(torch.ops.quantserve.best_int8_path())
    if cap < best:
        torch.ops.quantserve.set_int8_path(cap)
    log.info("quantserve CPU kernels loaded (%s, int8 path %s)", isa(), INT8_PATHS[min(cap, best)])
    return True


def _path_cap() -> int:
    """The highest int8 path `QUANTSERVE_INT8_PATH` allows (all when unset)."""
    name = os.environ.get("QUANTSERVE_INT8_PATH", "").strip().lower()
    if not name:
        return len(INT8_PATHS) - 1
    if name not in INT8_PATHS:
        raise ValueError(
            f"QUANTSERVE_INT8_PATH={name!r}: one of {', '.join(INT8_PATHS)}"
        )
    return INT8_PATHS.index(name)


def _register_fakes() -> None:
    """Output shapes for tracing (`torch.compile` of a decode step)."""

    @torch.library.register_fake("quantserve::int8_linear")
    def _int8(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("quantserve::int4_linear")
    def _int4(x: Tensor, packed: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
        return x.new_empty((x.shape[0], packed.shape[0]))


@contextmanager
def stock() -> Iterator[None]:
    """Run torch's stock kernels inside the block (benchmarks compare the two)."""
    was = available()
    _state["ok"] = False
    try:
        yield
    finally:
        _state["ok"] = was


def isa() -> str:
    """The instruction set the loaded kernels run on this CPU."""
    return ISA_NAMES[int(torch.ops.quantserve.isa_level())]


def int8_paths() -> list[str]:
    """The int8 kernel's paths this CPU runs, the one used by default last."""
    if not available():
        return []
    if not _paths:
        best = min(int(torch.ops.quantserve.best_int8_path()), _path_cap())
        _paths.extend(name for level, name in enumerate(INT8_PATHS[: best + 1]) if _runs(level))
    return _paths


def _runs(level: int) -> bool:
    before = int(torch.ops.quantserve.set_int8_path(level))
    if before >= 0:
        torch.ops.quantserve.set_int8_path(before)
    return before >= 0


@contextmanager
def int8_path(name: str) -> Iterator[None]:
    """Run the int8 kernel's `name` path inside the block (the int4 kernel takes
    its VNNI or AMX path alike); tests and benchmarks compare the paths, whose
    results are the same."""
    if name not in INT8_PATHS:
        raise ValueError(f"unknown int8 path {name!r}: one of {', '.join(INT8_PATHS)}")
    before = int(torch.ops.quantserve.set_int8_path(INT8_PATHS.index(name))) if available() else -1
    if before < 0:
        raise ValueError(f"this CPU does not run the int8 kernel's {name} path")
    _held["path"] = INT8_PATHS.index(name)
    try:
        yield
    finally:
        torch.ops.quantserve.set_int8_path(before)
        _held["path"] = before


def int8_kernel_rows() -> int:
    """Rows from which casting an int8 weight to bfloat16 for a bfloat16 matmul
    beats the int8 kernel (bench/kernels_bench.py, SmolLM2's shapes): on the
    AMX path the kernel leads to ~256 rows, on the vector paths (and torch's)
    to ~32."""
    paths = int8_paths()
    if not paths:
        return 32
    held = _held.get("path")
    return 256 if (paths[-1] if held is None else INT8_PATHS[held]) == "amx" else 32


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """bf16 x [M, K] @ (int8 weight [N, K] * scale [N]).T on CPU, bf16 [M, N]."""
    if available():
        return torch.ops.quantserve.int8_linear(x, weight, scale)
    return torch.ops.aten._weight_int8pack_mm(x, weight, scale)


def own_int4(packed: Tensor) -> bool:
    """Whether quantserve's int4 kernel can read this CPU-packed weight here."""
    return packed.shape[0] % INT4_BLOCK == 0 and "vnni" in int8_paths()

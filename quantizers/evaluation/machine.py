"""One line naming the machine a benchmark ran on: a speed figure from one CPU
says little about another (the same int8 decode ran 2x apart on two x86 CPUs
while llama.cpp barely moved), so every benchmark prints this beside its
figures."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

# The instruction-set flags that decide which kernels a CPU can run fast.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "i8mm", "bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo (empty elsewhere)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def describe_machine(threads: int | None = None) -> str:
    """`CPU model (arch), N cores, flags: ..., T torch threads, torch X`."""
    info = _cpuinfo()
    model = info.get("model name") or info.get("Model") or platform.processor() or "unknown CPU"
    present = set((info.get("flags") or info.get("Features") or "").split())
    flags = " ".join(f for f in KERNEL_FLAGS if f in present) or "none listed"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    used = threads if threads is not None else torch.get_num_threads()
    return (f"{model} ({platform.machine()}), {cores} cores, flags: {flags}; "
            f"{used} torch thread{'' if used == 1 else 's'}, torch {torch.__version__}")


def memory_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Measured read bandwidth in GB/s with `threads` torch threads: the best of
    `repeats` sums over a float32 buffer far larger than the caches (the
    ceiling a decode step that streams its weights once per token can reach)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(megabytes * 2**20 // 4)
        buffer.sum()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - start)
        return buffer.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(previous)

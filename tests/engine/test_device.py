"""Device memory arithmetic: the KV budget of --gpu-memory-utilization and a
quantisation job's headroom."""

from __future__ import annotations

import pytest
import torch

from quantizers import quantize
from server.engine import device as device_module
from server.engine.device import (
    InsufficientDeviceMemory,
    device_kv_cache_budget,
    ensure_free,
    kv_cache_budget,
    logical_weights,
    quantization_job_bytes,
    resolve_device,
)
from tests.engine.conftest import make_loaded

GIB = 2**30


def test_kv_budget_is_the_fraction_left_after_what_is_in_use() -> None:
    # 80 GiB device, 10 GiB in use: at 0.9 the pool may take 72 - 10 = 62 GiB
    assert kv_cache_budget(0.9, free=70 * GIB, total=80 * GIB) == 62 * GIB
    # more in use than the fraction allows: no room, never negative
    assert kv_cache_budget(0.5, free=30 * GIB, total=80 * GIB) == 0
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_budget(1.5, free=GIB, total=GIB)


def test_logical_weights_are_the_same_for_every_variant() -> None:
    float_count = logical_weights(make_loaded().model)
    for method, config in (("int8", None), ("int4", {"group_size": 32})):
        loaded = make_loaded()
        quantize(loaded.model, method, config)
        assert logical_weights(loaded.model) == float_count
    assert quantization_job_bytes(1000) == 10_000  # float32, twice, plus a quarter


def test_cpu_is_never_refused_and_has_no_kv_budget() -> None:
    ensure_free("cpu", 1 << 60, "anything")
    assert device_kv_cache_budget("cpu", 0.9) is None
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_short_cuda_memory_is_refused_with_the_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "memory_info", lambda device: (2 * GIB, 80 * GIB))
    with pytest.raises(InsufficientDeviceMemory, match=r"needs about 3\.00 GiB.*2\.00 GiB is free"):
        ensure_free("cuda:0", 3 * GIB, "quantising with gptq")
    ensure_free("cuda:0", GIB, "quantising with gptq")


def test_device_kv_budget_reads_the_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "memory_info", lambda device: (70 * GIB, 80 * GIB))
    assert device_kv_cache_budget("cuda:0", 0.9) == 62 * GIB

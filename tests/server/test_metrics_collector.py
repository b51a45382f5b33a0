"""Scrape-time gauges follow the engine snapshot, the active model and the artifact store."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from quantizers import quantize
from server.engine.types import EngineStats
from server.observability import install_observability
from tests.server.metrics_helpers import SnapshotEngine, samples, tiny_loaded_model, value

QUALITY = {"perplexity": 21.5, "base_perplexity": 20.0, "ratio": 1.075, "kl": 0.031, "top1": 0.93}


@pytest.fixture()
def app() -> FastAPI:
    app = FastAPI()
    install_observability(app)
    return app


@pytest.fixture()
def scrape(app: FastAPI) -> Callable[[], dict]:
    client = TestClient(app)
    return lambda: samples(client.get("/metrics").text)


def test_engine_snapshot_and_model_facts(app: FastAPI, scrape) -> None:
    loaded = tiny_loaded_model("tiny-a", quality=QUALITY)
    app.state.engine = SnapshotEngine(
        loaded, EngineStats(
            running=3, waiting=5, kv_cache_bytes=4096, max_batch=8, kv_blocks_total=100,
            kv_blocks_used=7, kv_blocks_cached=5, prefix_cache_queries=640,
            prefix_cache_hits=512, preemptions=2,
        ))
    parsed = scrape()
    labels = {"model": "tiny-a", "quantization": "float"}
    assert value(parsed, "quantserve_requests_running", **labels) == 3
    assert value(parsed, "quantserve_requests_waiting", **labels) == 5
    assert value(parsed, "quantserve_kv_cache_bytes", **labels) == 4096
    assert value(parsed, "quantserve_max_batch", **labels) == 8
    assert value(parsed, "quantserve_model_weight_bytes", **labels) == loaded.weight_bytes
    assert value(parsed, "quantserve_kv_cache_blocks", state="total", **labels) == 100
    assert value(parsed, "quantserve_kv_cache_blocks", state="used", **labels) == 7
    assert value(parsed, "quantserve_kv_cache_blocks", state="cached", **labels) == 5
    assert value(parsed, "quantserve_prefix_cache_queries_total", **labels) == 640
    assert value(parsed, "quantserve_prefix_cache_hits_total", **labels) == 512
    assert value(parsed, "quantserve_preemptions_total", **labels) == 2
    assert value(parsed, "quantserve_model_parameters", **labels) == loaded.param_count
    assert value(parsed, "quantserve_model_weight_bytes_per_parameter", **labels) == 4.0
    assert value(parsed, "quantserve_model_info", dtype="float32", device="cpu", **labels) == 1
    assert value(parsed, "quantserve_quality_perplexity", **labels) == 21.5
    assert value(parsed, "quantserve_quality_perplexity_ratio", **labels) == 1.075
    assert value(parsed, "quantserve_quality_kl_divergence", **labels) == 0.031
    assert value(parsed, "quantserve_quality_top1_agreement", **labels) == 0.93


def test_memory_breakdown_adds_up_to_rss(app: FastAPI, scrape) -> None:
    loaded = tiny_loaded_model("tiny-mem")
    app.state.engine = SnapshotEngine(
        loaded, EngineStats(running=1, waiting=0, kv_cache_bytes=1000, max_batch=8))
    parsed = scrape()
    parts = {c: value(parsed, "quantserve_memory_breakdown_bytes", component=c, device="cpu")
             for c in ("weights", "kv_cache", "other")}
    assert parts["weights"] == loaded.weight_bytes
    assert parts["kv_cache"] == 1000
    rss = value(parsed, "process_resident_memory_bytes")
    # RSS moves between the collector's read and the process collector's read; a page or two.
    assert sum(parts.values()) == pytest.approx(rss, rel=0.02)
    assert value(parsed, "quantserve_process_peak_resident_memory_bytes") >= rss * 0.98


def test_swapped_quantized_model_reports_its_own_facts(app: FastAPI, scrape) -> None:
    """After a swap to a real int8 or int4 variant, labels and facts follow the new model;
    quantisation keeps the weight count and cuts the stored bits per weight."""
    engine = SnapshotEngine(tiny_loaded_model("tiny-before"))
    app.state.engine = engine
    float_params = value(scrape(), "quantserve_model_parameters",
                         model="tiny-before", quantization="float")
    bits = {}
    for method, config in (("int8", {}), ("int4", {"group_size": 32})):
        loaded = tiny_loaded_model(f"tiny-{method}")
        quantize(loaded.model, method, config)
        loaded.quantization = {"method": method, **config}
        engine.loaded = loaded
        parsed = scrape()
        labels = {"model": f"tiny-{method}", "quantization": method}
        assert value(parsed, "quantserve_model_parameters", **labels) == float_params
        assert value(parsed, "quantserve_model_weight_bytes", **labels) == loaded.weight_bytes
        bits[method] = 8 * value(parsed, "quantserve_model_weight_bytes_per_parameter", **labels)
        assert ("quantserve_model_weight_bytes",
                frozenset({"model": "tiny-before", "quantization": "float"}.items())) not in parsed
        # No quality report on this model: the gauges exist but carry no sample.
        assert not any(name.startswith("quantserve_quality_") for name, _ in parsed)
    # Float embeddings (bf16 after quantisation) keep both above the linears' own width.
    assert 4 < bits["int4"] < bits["int8"] < 16


def test_cache_counters_come_from_the_artifact_store(app: FastAPI, scrape) -> None:
    app.state.artifact_store = SimpleNamespace(hits=4, misses=2, evictions=1, corrupt=0)
    parsed = scrape()
    assert value(parsed, "quantserve_artifact_cache_hits_total") == 4
    assert value(parsed, "quantserve_artifact_cache_misses_total") == 2
    assert value(parsed, "quantserve_artifact_cache_evictions_total") == 1
    assert ("quantserve_artifact_cache_corrupt_total", frozenset()) in parsed


def test_scrape_without_engine_still_lists_every_family(scrape) -> None:
    """During start-up there is no engine yet; /metrics must still answer."""
    names = {name for name, _ in scrape()}
    assert "process_resident_memory_bytes" in names
    assert "quantserve_artifact_cache_hits_total" in names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_gauges_follow_allocations(app: FastAPI, scrape) -> None:
    loaded = tiny_loaded_model("tiny-cuda")
    loaded.model.to("cuda:0")
    app.state.engine = SnapshotEngine(loaded)
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:0")
    parsed = scrape()
    allocated = value(parsed, "quantserve_cuda_memory_allocated_bytes", device="cuda:0")
    assert allocated >= block.numel() + loaded.weight_bytes
    assert value(parsed, "quantserve_cuda_memory_reserved_bytes", device="cuda:0") >= allocated
    peak = value(parsed, "quantserve_cuda_memory_peak_allocated_bytes", device="cuda:0")
    assert peak >= allocated
    parts = {c: value(parsed, "quantserve_memory_breakdown_bytes", component=c, device="cuda:0")
             for c in ("weights", "kv_cache", "other")}
    assert parts["weights"] == loaded.weight_bytes
    assert sum(parts.values()) == allocated

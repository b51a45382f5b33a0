"""Gauges read from the live application state at scrape time.

Queue depth, memory and the active model change on their own, so instead of
updating gauges from many places we read them when Prometheus asks. The reads
must stay cheap and lock-free: `Engine.stats()` is a lock-free snapshot,
`Engine.loaded` is a plain attribute read, per-model facts that need a walk
over the parameters are computed once per loaded model and cached, and CUDA
is only queried when this process has already initialised it (querying would
otherwise create a CUDA context from the scrape).

Artifact cache counters come from attributes of `app.state.artifact_store`
(`hits`, `misses`, `evictions`, `corrupt`): the store keeps its own counts and
this collector exposes them, so the store needs no metrics code.
"""

from __future__ import annotations

import resource
import sys
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from quantizers.loading import weight_bytes
from quantizers.runtime.base import QuantizedLinear
from server.engine.device import kv_cache_budget, memory_info

_MODEL_LABELS = ["model", "quantization"]
_CACHE_COUNTERS = ("hits", "misses", "evictions", "corrupt")

# Gauge name -> (help, key in the quality report that
# quantizers.evaluation.report.quality_report returns and the server keeps in
# LoadedModel.metadata["quality"]).
QUALITY_GAUGES: dict[str, tuple[str, str]] = {
    "perplexity": ("Perplexity of the active model on the evaluation text.", "perplexity"),
    "perplexity_ratio": (
        "Perplexity of the active model divided by the float base model's.", "ratio"),
    "kl_divergence": (
        "Mean KL divergence of the active model's next-token distribution from the base's.",
        "kl"),
    "top1_agreement": (
        "Fraction of positions where the active model's top token equals the base's.", "top1"),
}


@dataclass(frozen=True)
class _ModelFacts:
    """What the scrape reports about a loaded model that does not change while it is loaded."""

    weight_bytes: int
    param_count: int
    bytes_per_weight: float
    device: str
    dtype: str


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process; Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss_bytes() -> int:
    """Resident set size now, from /proc (the same source as process_resident_memory_bytes)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()


def _weight_totals(model: torch.nn.Module) -> tuple[int, int]:
    """(stored bytes, logical weights) over the float parameters and quantised linears.

    A quantised linear keeps its packed weights and scales as buffers, so
    `LoadedModel.param_count` would miss its weights; counting its logical
    in x out weights against its stored bytes gives honest bits per weight for
    every variant. Other buffers (rotary frequencies) are not weights.
    """
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            stored += weight_bytes(module)
            count += module.in_features * module.out_features
    return stored, count


class ServerStateCollector(Collector):
    """Reads the engine, the active model and the artifact store of one app."""

    def __init__(self) -> None:
        self._state: Any = None
        self._facts_for: weakref.ref[Any] | None = None
        self._facts: _ModelFacts | None = None

    def attach(self, state: Any) -> None:
        """Point the collector at an app's `state` (the server has one app per process)."""
        self._state = state

    def describe(self) -> list[Metric]:
        """No fixed description: the registry must not call collect() at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._state
        engine = getattr(state, "engine", None)
        loaded = getattr(engine, "loaded", None) if engine is not None else None
        labels = [loaded.model_id, loaded.variant] if loaded is not None else None
        facts = self._model_facts(loaded) if loaded is not None else None
        kv_bytes = yield from self._engine_gauges(engine, labels)
        yield from self._model_gauges(loaded, labels, facts)
        yield from self._memory_gauges(facts, kv_bytes)
        yield from self._cuda_gauges()
        settings = getattr(state, "settings", None)
        yield self._kv_budget_gauge(
            facts, kv_bytes, getattr(settings, "gpu_memory_utilization", None)
        )
        yield from self._cache_counters(getattr(state, "artifact_store", None))

    def _model_facts(self, loaded: Any) -> _ModelFacts:
        if self._facts_for is not None and self._facts_for() is loaded and self._facts:
            return self._facts
        stored, count = _weight_totals(loaded.model)
        facts = _ModelFacts(
            weight_bytes=int(loaded.weight_bytes),
            param_count=count,
            bytes_per_weight=stored / count if count else 0.0,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
        )
        self._facts_for, self._facts = weakref.ref(loaded), facts
        return facts

    @staticmethod
    def _engine_gauges(
        engine: Any, labels: list[str] | None
    ) -> Generator[Metric, None, int]:
        """Queue, batch and KV cache gauges and counters; returns the KV-cache bytes
        for the memory breakdown."""
        families = {
            "running": GaugeMetricFamily(
                "quantserve_requests_running", "Sequences in the running batch.",
                labels=_MODEL_LABELS),
            "waiting": GaugeMetricFamily(
                "quantserve_requests_waiting", "Sequences queued for admission.",
                labels=_MODEL_LABELS),
            "kv_cache_bytes": GaugeMetricFamily(
                "quantserve_kv_cache_bytes",
                "Bytes of KV cache blocks holding tokens (used by sequences or cached prefixes).",
                labels=_MODEL_LABELS),
            "max_batch": GaugeMetricFamily(
                "quantserve_max_batch", "Sequences the running batch may hold.",
                labels=_MODEL_LABELS),
        }
        blocks = GaugeMetricFamily(
            "quantserve_kv_cache_blocks",
            "KV cache blocks by state: total in the pool, used by running sequences, "
            "cached (unused, kept for prefix reuse until evicted).",
            labels=[*_MODEL_LABELS, "state"])
        counters = {
            "prefix_cache_queries": CounterMetricFamily(
                "quantserve_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.", labels=_MODEL_LABELS),
            "prefix_cache_hits": CounterMetricFamily(
                "quantserve_prefix_cache_hits",
                "Prompt tokens whose KV was found in the prefix cache.", labels=_MODEL_LABELS),
            "preemptions": CounterMetricFamily(
                "quantserve_preemptions",
                "Running sequences preempted (to be recomputed) when the KV cache ran out "
                "of blocks.", labels=_MODEL_LABELS),
        }
        kv_bytes = 0
        if engine is not None and labels is not None:
            stats = engine.stats()
            kv_bytes = stats.kv_cache_bytes
            for field, family in families.items():
                family.add_metric(labels, getattr(stats, field))
            for state in ("total", "used", "cached"):
                blocks.add_metric([*labels, state], getattr(stats, f"kv_blocks_{state}"))
            for field, counter in counters.items():
                counter.add_metric(labels, getattr(stats, field))
        yield from (*families.values(), blocks, *counters.values())
        return kv_bytes

    @staticmethod
    def _model_gauges(
        loaded: Any, labels: list[str] | None, facts: _ModelFacts | None
    ) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "quantserve_model_info", "The active model (value 1), with its dtype and device.",
            labels=[*_MODEL_LABELS, "dtype", "device"])
        weights = GaugeMetricFamily(
            "quantserve_model_weight_bytes", "Bytes of weights (parameters and buffers) in memory.",
            labels=_MODEL_LABELS)
        params = GaugeMetricFamily(
            "quantserve_model_parameters",
            "Weights of the active model, counting each quantised weight once.",
            labels=_MODEL_LABELS)
        # Prometheus names use base units, so bits per weight is exported in bytes.
        per_weight = GaugeMetricFamily(
            "quantserve_model_weight_bytes_per_parameter",
            "Stored bytes per weight of the active model (times 8: bits per weight).",
            labels=_MODEL_LABELS)
        quality = {
            name: GaugeMetricFamily(f"quantserve_quality_{name}", text, labels=_MODEL_LABELS)
            for name, (text, _) in QUALITY_GAUGES.items()
        }
        if loaded is not None and labels is not None and facts is not None:
            info.add_metric([*labels, facts.dtype, facts.device], 1)
            weights.add_metric(labels, facts.weight_bytes)
            params.add_metric(labels, facts.param_count)
            per_weight.add_metric(labels, facts.bytes_per_weight)
            report = (loaded.metadata or {}).get("quality") or {}
            for name, (_, key) in QUALITY_GAUGES.items():
                value = report.get(key)
                if isinstance(value, int | float):
                    quality[name].add_metric(labels, float(value))
        yield from (info, weights, params, per_weight, *quality.values())

    @staticmethod
    def _memory_gauges(facts: _ModelFacts | None, kv_bytes: int) -> Iterator[Metric]:
        """Peak RSS, and the active device's memory split into weights, KV cache and the rest.

        On CUDA the total is what torch has allocated on the model's device; on
        CPU it is the process RSS (weights and KV cache live in host memory).
        """
        peak = GaugeMetricFamily(
            "quantserve_process_peak_resident_memory_bytes",
            "Peak resident memory of the server process since it started.")
        peak.add_metric([], _peak_rss_bytes())
        breakdown = GaugeMetricFamily(
            "quantserve_memory_breakdown_bytes",
            "Memory of the model's device by component: weights, kv_cache, other.",
            labels=["component", "device"])
        if facts is not None:
            if facts.device.startswith("cuda") and torch.cuda.is_initialized():
                total = torch.cuda.memory_allocated(torch.device(facts.device))
            else:
                total = _current_rss_bytes()
            other = max(total - facts.weight_bytes - kv_bytes, 0)
            for component, value in (
                ("weights", facts.weight_bytes), ("kv_cache", kv_bytes), ("other", other)
            ):
                breakdown.add_metric([component, facts.device], value)
        yield from (peak, breakdown)

    @staticmethod
    def _cuda_gauges() -> Iterator[Metric]:
        families = {
            "allocated": GaugeMetricFamily(
                "quantserve_cuda_memory_allocated_bytes", "torch.cuda memory allocated now.",
                labels=["device"]),
            "reserved": GaugeMetricFamily(
                "quantserve_cuda_memory_reserved_bytes",
                "torch.cuda memory reserved by the caching allocator.",
                labels=["device"]),
            "peak": GaugeMetricFamily(
                "quantserve_cuda_memory_peak_allocated_bytes", "Peak torch.cuda memory allocated.",
                labels=["device"]),
            "free": GaugeMetricFamily(
                "quantserve_cuda_memory_free_bytes",
                "Device memory this process can still use: the driver's free memory plus "
                "what torch's allocator holds unused.",
                labels=["device"]),
            "total": GaugeMetricFamily(
                "quantserve_cuda_memory_total_bytes", "Device memory in all.",
                labels=["device"]),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                families["allocated"].add_metric([device], torch.cuda.memory_allocated(index))
                families["reserved"].add_metric([device], torch.cuda.memory_reserved(index))
                families["peak"].add_metric([device], torch.cuda.max_memory_allocated(index))
                free, total = memory_info(device) or (0, 0)
                families["free"].add_metric([device], free)
                families["total"].add_metric([device], total)
        yield from families.values()

    @staticmethod
    def _kv_budget_gauge(
        facts: _ModelFacts | None, kv_bytes: int, utilization: float | None
    ) -> Metric:
        """The KV-cache bytes `--gpu-memory-utilization` allows on the model's CUDA
        device: what the cache holds now plus what the fraction leaves free."""
        budget = GaugeMetricFamily(
            "quantserve_kv_cache_budget_bytes",
            "KV-cache bytes the GPU memory utilization setting allows (CUDA only).",
            labels=["device"])
        on_cuda = facts is not None and facts.device.startswith("cuda")
        if on_cuda and utilization is not None and torch.cuda.is_initialized():
            free, total = memory_info(facts.device)
            budget.add_metric([facts.device], kv_cache_budget(utilization, free + kv_bytes, total))
        return budget

    @staticmethod
    def _cache_counters(store: Any) -> Iterator[Metric]:
        for name in _CACHE_COUNTERS:
            family = CounterMetricFamily(
                f"quantserve_artifact_cache_{name}",
                f"Quantised-artifact cache {name} counted by the artifact store.")
            family.add_metric([], float(getattr(store, name, 0) or 0))
            yield family


STATE_COLLECTOR = ServerStateCollector()
REGISTRY.register(STATE_COLLECTOR)

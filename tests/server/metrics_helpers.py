"""Shared pieces for the metrics tests: a tiny real model and Prometheus parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import LlamaConfig, LlamaForCausalLM

from quantizers.loading import LoadedModel
from server.engine.types import EngineStats


def tiny_loaded_model(model_id: str, **metadata: object) -> LoadedModel:
    """A random-initialised 2-layer Llama wrapped like a served model."""
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        model_id=model_id, model=model, tokenizer=None, source=Path("/nonexistent"),
        dtype=torch.float32, metadata=dict(metadata),
    )


@dataclass
class SnapshotEngine:
    """Just the two members of the Engine contract that /metrics reads.

    The collector must only use `stats()` and `loaded`; a test double with
    nothing else proves it touches no other engine state (and no lock)."""

    loaded: LoadedModel
    snapshot: EngineStats = field(
        default_factory=lambda: EngineStats(running=0, waiting=0, kv_cache_bytes=0, max_batch=8))

    def stats(self) -> EngineStats:
        return self.snapshot


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse Prometheus text into {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float:
    """One sample's value, 0.0 when the series does not exist yet."""
    return parsed.get((name, frozenset(labels.items())), 0.0)

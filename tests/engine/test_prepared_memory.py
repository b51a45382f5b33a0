"""Preparing a model for the runner holds its weights once: the prepared
modules replace the originals inside the model (which are then freed; a
packed head tied to the embedding is the one, reported, extra), the
model's own forward still computes the same numbers, and so does a second
runner on the same model."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import Tensor, nn

from quantizers.loading import weight_bytes
from server.engine.llama_runner import LlamaRunner
from server.engine.projections import FusedPart, PackedLinear
from tests.engine.paged import scratch_cache
from tests.engine.test_prepared import VARIANTS, _model

# Concatenated biases and the packed weights' one-element stand-ins.
_SCRATCH_BYTES = 4096


def _packed_bytes(module: nn.Module | None) -> int:
    """The opaque packed weights under `module` (the blocked layout holds the same elements)."""
    if module is None:
        return 0
    packed = [m.packed for m in module.modules() if isinstance(m, PackedLinear)]
    return sum(p.numel() * p.element_size() for p in packed)


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage the model's parameters and buffers use,
    plus its packed weights."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*model.parameters(), *model.buffers()]
    }
    return sum(storages.values()) + _packed_bytes(model)


def _tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize(("dtype", "method", "config"), VARIANTS)
def test_preparation_frees_what_it_replaces(
    dtype: str, method: str | None, config: dict | None
) -> None:
    model = _model(dtype, method, config)
    before = _storage_bytes(model)
    reported = weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    originals = [weakref.ref(t) for t in _tensors(model)]
    runner = LlamaRunner(model, max_seq_len=32)
    gc.collect()
    assert all(p.prepared is not None for p in [*runner.qkv, *runner.gate_up])
    kept = {id(t) for t in _tensors(model)}
    assert all(ref() is None or id(ref()) in kept for ref in originals)
    packed_head = isinstance(runner.lm_head.prepared, PackedLinear)
    head = model.lm_head.weight
    extra = head.numel() * head.element_size() if packed_head else 0
    assert before + extra <= _storage_bytes(model) + _packed_bytes(runner.lm_head.prepared)
    assert _storage_bytes(model) <= before + _SCRATCH_BYTES
    assert runner.prepared_weight_bytes == extra
    # What the server reports about the model does not change either.
    assert weight_bytes(model) == reported
    if method is None:
        assert sum(p.numel() for p in model.parameters()) == params


def test_replaced_modules_held_elsewhere_are_reported_as_extra_bytes() -> None:
    model = _model("bfloat16", "int8", None)
    held = model.model.layers[0].self_attn.q_proj
    runner = LlamaRunner(model, max_seq_len=16)
    assert runner.prepared_weight_bytes == sum(t.numel() * t.element_size() for t in _tensors(held))
    del held
    gc.collect()
    assert runner.prepared_weight_bytes == 0


@pytest.mark.parametrize(("dtype", "method", "config"), VARIANTS)
def test_model_forward_is_unchanged_by_preparation(
    dtype: str, method: str | None, config: dict | None
) -> None:
    model = _model(dtype, method, config)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.inference_mode():
        want = model(ids).logits
        LlamaRunner(model, max_seq_len=16)
        got = model(ids).logits
    assert isinstance(model.model.layers[0].self_attn.q_proj, FusedPart)
    assert torch.equal(want, got)


def test_second_runner_on_a_prepared_model_runs_the_installed_modules() -> None:
    """The installed parts are not fused again (they are not plain linears);
    the second runner calls them one by one and computes the same numbers."""
    model = _model("bfloat16", None, None)
    first = LlamaRunner(model, max_seq_len=16, native=False)
    second = LlamaRunner(model, max_seq_len=16, native=False)
    assert all(p.prepared is None for p in [*second.qkv, *second.gate_up])
    assert second.prepared_weight_bytes == first.prepared_weight_bytes  # each packs the tied head
    cache, tables = scratch_cache(first, 1, 3)
    prompt = [1, 2, 3]
    table = tables[0]
    assert torch.equal(first.prefill(cache, table, prompt), second.prefill(cache, table, prompt))

"""Packed prefill: short new prompts that arrive together run through the
weights as one pass, and every sequence's logits are the ones its own prefill
computes (so greedy output alone still equals batched)."""

from __future__ import annotations

import pytest
import torch

from quantizers import kernels, quantize
from server.engine import Engine
from server.engine.kv_cache import KVCache
from server.engine.llama_runner import LlamaRunner
from tests.engine.conftest import make_loaded
from tests.engine.streams import request, run, run_all

PROMPTS = ["Once upon a time", "def main():", "1, 2, 3,", "The capital of France is", "a"]

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")


def int8_runner() -> LlamaRunner:
    loaded = make_loaded(dtype=torch.bfloat16)
    quantize(loaded.model, "int8")
    return LlamaRunner(loaded.model, max_seq_len=256)


@needs_kernels
def test_packed_logits_are_each_sequences_own() -> None:
    runner = int8_runner()
    # int8's own kernel computes each row alone: up to its row limit
    assert runner.pack_rows == (128 if kernels.int8_kernel_rows() > 128 else 31)
    cache = KVCache(runner.kv_spec, 16, 16)
    cache.k[0].zero_()
    prompts = [([2 * i, 2 * i + 1], list(range(10 + i, 17 + 3 * i))) for i in range(4)]
    alone = torch.cat([runner.prefill(cache, blocks, tokens) for blocks, tokens in prompts])
    written = cache.k[0].clone()
    cache.k[0].zero_()
    packed = runner.prefill_packed(cache, prompts)
    assert packed.shape == (4, alone.shape[1])
    assert torch.equal(packed, alone)
    assert torch.equal(cache.k[0], written)  # every prompt's keys in its own blocks
    too_many = [([0, 1, 2, 3, 4, 5, 6, 7, 8], list(range(runner.pack_rows + 1)))]
    with pytest.raises(ValueError, match="packed prefill"):
        runner.prefill_packed(cache, too_many)


def test_a_projection_whose_rows_depend_on_the_batch_is_never_packed() -> None:
    runner = LlamaRunner(make_loaded(dtype=torch.bfloat16).model, max_seq_len=64)
    down = runner.down[0]
    joint = down.joint
    down.joint = lambda x: joint(x) + x.shape[0]  # type: ignore[method-assign]
    assert runner._pack_rows() == 0


@needs_kernels
def test_engine_packs_prompts_that_arrive_together() -> None:
    loaded = make_loaded(dtype=torch.bfloat16)
    quantize(loaded.model, "int8")
    engine = Engine(loaded, max_num_seqs=8, max_model_len=256, num_threads=1)
    engine.start()
    packs: list[int] = []
    worker = engine._worker
    prefill_packed = worker.prefill_packed

    def spy(batch: list) -> torch.Tensor:
        packs.append(len(batch))
        return prefill_packed(batch)

    worker.prefill_packed = spy  # type: ignore[method-assign]
    try:
        requests = [
            request(loaded.tokenizer.encode(p), max_tokens=8, ignore_eos=True) for p in PROMPTS
        ]
        alone = [run(engine, r).token_ids for r in requests]
        assert packs == []  # one at a time: nothing to pack
        together = [r.token_ids for r in run_all(engine, requests)]
    finally:
        engine.shutdown()
    assert together == alone
    assert sum(packs) >= 2

"""The int8 KV cache: codes and scales, pool size, and both runners reading it.

What "close" means here: int8 rows carry a rounding error of at most half a
step (max|row| / 254) per number, and attention averages it; on these tiny
models, decoding a forced token sequence from the int8 cache gives log-probs
within a few thousandths of those from the float cache, and the same greedy
tokens. The bounds asserted are a few times what is measured, and far below
what any mistake (a missing scale, a wrong row) gives. (The engine tests'
model, initialised 25 times larger, amplifies the error to ~0.2: these use
models initialised as transformers does.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantizers.kv_int8 import dequantize_rows, quantize_rows
from quantizers.loading import LoadedModel, load_model
from server.engine import Engine
from server.engine.hf_runner import GeneralRunner
from server.engine.kv_cache import Int8Rows, KVCache, KVPool, KVSpec
from server.engine.llama_runner import LlamaRunner
from server.engine.worker import CacheConfig
from tests.engine.streams import request, run
from tests.helpers.tiny_architectures import write_tiny_architecture
from tests.helpers.tiny_model_dir import write_tiny_model

NEW_TOKENS = 12


def test_rows_round_trip_within_half_a_step() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]
    x[0, 0] = 0.0
    codes, scales = quantize_rows(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert codes.shape == x.shape and scales.shape == x.shape[:-1]
    back = dequantize_rows(codes, scales, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((back - x).abs() <= step * 0.502 + 1e-7)
    assert torch.equal(back[0, 0], torch.zeros(64))
    assert int(codes.abs().amax(-1).flatten()[1:].min()) >= 126  # nonzero rows use the range


def test_int8_rows_read_what_was_written() -> None:
    rows = Int8Rows(
        torch.zeros(8, 2, 16, dtype=torch.int8),
        torch.zeros(8, 2, dtype=torch.float16),
        torch.bfloat16,
    )
    x = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    rows.index_copy_(0, torch.tensor([5, 1, 6]), x)
    picked = rows.index_select(0, torch.tensor([1, 5, 6]))
    assert picked.dtype == torch.bfloat16
    torch.testing.assert_close(picked, x[[1, 0, 2]], atol=0.02, rtol=0.01)
    torch.testing.assert_close(rows[5:7], x[[0, 2]], atol=0.02, rtol=0.01)


def test_a_budget_holds_about_twice_the_blocks() -> None:
    """SmolLM2-135M's KV shape: 30 layers, 3 KV heads of 64, bf16 (128 bytes a
    row) against int8 (64 codes and a 2-byte scale)."""
    spec = KVSpec(
        layers=30, kv_heads=3, head_dim=64, dtype=torch.bfloat16, device=torch.device("cpu")
    )
    budget = 64 << 20
    auto = KVPool.create(spec, budget_bytes=budget, block_size=16)
    int8 = KVPool.create(
        dataclasses.replace(spec, cache_dtype="int8"), budget_bytes=budget, block_size=16
    )
    assert auto.block_bytes == 2 * 30 * 16 * 3 * 128
    assert int8.block_bytes == 2 * 30 * 16 * 3 * 66
    assert int8.cache.num_blocks == budget // int8.block_bytes
    assert int8.cache.num_blocks / auto.cache.num_blocks > 1.9
    # What the pool really allocated is what it reports.
    assert int8.cache.nbytes == int8.cache.num_blocks * int8.block_bytes <= budget
    assert auto.cache.nbytes == auto.cache.num_blocks * auto.block_bytes


def _forced(
    runner: LlamaRunner | GeneralRunner, cache: KVCache, prompt: list[int], tokens: list[int] | None
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their log-probs; with `tokens`, those are fed instead."""
    table = list(range(cache.num_blocks))
    logits = runner.prefill(cache, table, prompt)[-1]
    out, logprobs = [], []
    for i in range(NEW_TOKENS):
        token = int(logits.argmax()) if tokens is None else tokens[i]
        out.append(token)
        logprobs.append(torch.log_softmax(logits, -1)[token])
        logits = runner.decode(cache, torch.tensor([token]), [len(prompt) + i], [table])[0]
    return out, torch.stack(logprobs)


def _compare(runner: LlamaRunner | GeneralRunner, prompt: list[int], tolerance: float) -> None:
    spec = runner.kv_spec
    blocks = -(-(len(prompt) + NEW_TOKENS) // 4)
    tokens, reference = _forced(runner, KVCache(spec, blocks, 4), prompt, None)
    int8 = KVCache(dataclasses.replace(spec, cache_dtype="int8"), blocks, 4)
    greedy, _ = _forced(runner, int8, prompt, None)
    _, logprobs = _forced(runner, int8, prompt, tokens)
    assert isinstance(int8.k[0], Int8Rows)
    assert greedy == tokens
    assert 0 < float((logprobs - reference).abs().max()) < tolerance


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_runner_decodes_from_int8_close_to_float(
    dtype: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = write_tiny_model(tmp_path_factory.mktemp("llama"))
    runner = LlamaRunner(load_model(directory, dtype=dtype).model, max_seq_len=128)
    _compare(runner, list(range(40, 70)), 0.05)


@pytest.mark.parametrize("model_type", ["qwen3", "gpt2"])
def test_general_runner_decodes_from_int8_close_to_float(
    model_type: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = write_tiny_architecture(tmp_path_factory.mktemp(model_type), model_type)
    _compare(GeneralRunner(load_model(directory).model), list(range(40, 70)), 0.05)


def test_prefix_hits_on_an_int8_pool(loaded: LoadedModel) -> None:
    """A prompt past one prefill chunk (128 tokens) served twice: the second
    finds its first chunk in the int8 pool and continues with the same tokens."""
    cache = CacheConfig(kv_cache_bytes=1 << 20, kv_cache_dtype="int8")
    engine = Engine(loaded, max_num_seqs=2, max_model_len=256, cache=cache, num_threads=1)
    engine.start()
    prompt = [(5 * i) % 250 + 3 for i in range(150)]
    try:
        first = run(engine, request(prompt, max_tokens=8, ignore_eos=True)).token_ids
        second = run(engine, request(prompt, max_tokens=8, ignore_eos=True)).token_ids
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats.prefix_cache_hits == 128
    assert second == first
    pool = engine._worker.active.pool
    assert pool is not None and pool.cache.spec.cache_dtype == "int8"
    held = stats.kv_blocks_used + stats.kv_blocks_cached
    assert stats.kv_cache_bytes == held * pool.block_bytes
    assert stats.extra["kv_pool_bytes"] == pool.cache.nbytes


def test_a_bad_kv_cache_dtype_is_refused_by_name(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, not 'fp8'"):
        CacheConfig(kv_cache_dtype="fp8")

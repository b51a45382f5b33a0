"""The engine on the real embedded model: same greedy text as transformers'
`generate`, alone and batched, through the chat template's stop token; the
prepared bf16 path computes exactly what the model's own modules compute."""

from __future__ import annotations

import copy

import pytest
import torch

from quantizers.loading import LoadedModel
from server.engine import Engine
from server.engine.llama_runner import LlamaRunner
from tests.engine.paged import scratch_cache
from tests.engine.streams import request, run, run_all


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    from quantizers.loading import load_model

    return load_model(dtype="float32")


@pytest.mark.slow
def test_smollm2_prepared_bf16_decode_is_exact(loaded: LoadedModel) -> None:
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    prompt = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    logits = []
    for prepare in (False, True):
        runner = LlamaRunner(model, max_seq_len=128, prepare=prepare, native=False)
        cache, tables = scratch_cache(runner, 1, len(prompt) + 8, block_size=16)
        steps = [runner.prefill(cache, tables[0], prompt)]
        for position in range(len(prompt), len(prompt) + 8):
            token = steps[-1].argmax(-1)
            steps.append(runner.decode(cache, token, [position], tables))
        logits.append(steps)
        if prepare:
            assert all(p.prepared is not None for p in [*runner.qkv, *runner.gate_up])
    assert all(torch.equal(a, b) for a, b in zip(*logits, strict=True))


@pytest.mark.slow
def test_smollm2_greedy_matches_generate_alone_and_batched(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    questions = ["What is the capital of France?", "Name three colours.", "Count to five."]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        for q in questions
    ]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.inference_mode():
        expected = [
            loaded.model.generate(
                torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=end
            )[0, len(p):].tolist()
            for p in prompts
        ]
    engine = Engine(loaded, max_num_seqs=4, max_model_len=512, num_threads=2)
    engine.start()
    try:
        reqs = [request(p, max_tokens=24, stop_token_ids=(end,)) for p in prompts]
        alone = [run(engine, r) for r in reqs]
        batched = run_all(engine, reqs)
    finally:
        engine.shutdown()
    for want, one, many in zip(expected, alone, batched, strict=True):
        generated = [t for t in want if t != end]
        assert one.token_ids == generated
        assert many.token_ids == generated
        assert one.text == tokenizer.decode(generated, skip_special_tokens=True)
    assert "Paris" in alone[0].text


@pytest.mark.slow
def test_smollm2_bf16_greedy_alone_equals_batched_with_prefix_hits_and_after_a_swap() -> None:
    """The shipped dtype: a sequence's greedy tokens do not depend on what shares
    its batch, nor on whether its prompt's head came from the prefix cache, and
    a swapped-in model (sharing the pool) behaves the same."""
    from quantizers.loading import load_model

    bf16 = load_model(dtype="bfloat16")
    tokenizer = bf16.tokenizer
    # Longer than one prefill chunk (128 tokens), so later prompts reuse its KV.
    system = "You are a concise assistant. Answer in one short sentence, without lists. " * 10
    questions = ["What is the capital of France?", "Name three colours.", "Count to five.",
                 "Why is the sky blue?"]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            add_generation_prompt=True, tokenize=True, return_dict=False,
        )
        for q in questions
    ]
    reqs = [request(p, f"q{i}", max_tokens=12, ignore_eos=True) for i, p in enumerate(prompts)]
    engine = Engine(bf16, max_num_seqs=4, max_model_len=512, num_threads=2)
    engine.start()
    try:
        alone = [run(engine, r).token_ids for r in reqs]
        stats = engine.stats()
        assert stats.prefix_cache_hits > 0  # later prompts reused the shared system prompt
        assert [r.token_ids for r in run_all(engine, reqs)] == alone
        pool = engine._worker.active.pool
        # A new served version (its own runner, over the modules the first one
        # installed): a model of another version never sees this one's prefixes.
        engine.swap_model(bf16)
        assert engine._worker.active.pool is pool  # same KV shape: the pool is reused
        swapped_alone = [run(engine, r).token_ids for r in reqs]
        swapped_batched = [r.token_ids for r in run_all(engine, reqs)]
    finally:
        engine.shutdown()
    assert swapped_alone == alone
    assert swapped_batched == alone

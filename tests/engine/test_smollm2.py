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
        runner = LlamaRunner(model, max_seq_len=128, prepare=prepare)
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

"""The engine on the real embedded model: same greedy text as transformers'
`generate`, alone and batched, through the chat template's stop token."""

from __future__ import annotations

import pytest
import torch

from server.engine import Engine
from tests.engine.streams import request, run, run_all


@pytest.mark.slow
def test_smollm2_greedy_matches_generate_alone_and_batched() -> None:
    from quantizers.loading import load_model

    loaded = load_model(dtype="float32")
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
    engine = Engine(loaded, max_batch=4, max_batch_tokens=512, num_threads=2)
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

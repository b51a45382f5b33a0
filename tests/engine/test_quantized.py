"""Quantised models (engineer A's runtime modules, bf16 activations) go through
the same batched path, and their low-bit kernels run inside it."""

from __future__ import annotations

import pytest

from quantizers import quantize
from server.engine import Engine
from tests.engine.conftest import make_loaded
from tests.engine.streams import reference_greedy, request, run, run_all

PROMPTS = ["Once upon a time", "def main():", "1, 2, 3,", "The capital of France is"]


@pytest.mark.parametrize(("method", "config"), [("int8", None), ("int4", {"group_size": 32})])
def test_quantized_model_batches_with_its_kernels(method: str, config: dict | None) -> None:
    loaded = make_loaded()
    report = quantize(loaded.model, method, config)
    loaded.quantization = report.to_dict()
    kernel_modules = [
        m for m in loaded.model.modules() if type(m).__name__.endswith("WeightOnlyLinear")
    ]
    assert kernel_modules
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    hooks = [m.register_forward_hook(count) for m in kernel_modules]
    engine = Engine(loaded, max_num_seqs=4, max_model_len=512, num_threads=1)
    engine.start()
    try:
        requests = [
            request(loaded.tokenizer.encode(p), max_tokens=10, ignore_eos=True) for p in PROMPTS
        ]
        calls = 0
        alone = [run(engine, r) for r in requests]
        batched = run_all(engine, requests)
    finally:
        engine.shutdown()
        for hook in hooks:
            hook.remove()
    assert calls > 0
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert alone[0].finish.variant == method
    first = requests[0].prompt_ids
    assert alone[0].token_ids[:4] == reference_greedy(loaded.model, first, 4)


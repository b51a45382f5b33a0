"""The int8-KV view of a model that `bench/kv_cache_quality.py` scores."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantizers.evaluation.divergence import compare
from quantizers.evaluation.kv_cache import Int8KVModel, Int8RoundTrip
from quantizers.kv_int8 import fake_quantize_rows


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def test_every_layer_attends_over_int8_rounded_keys_and_values() -> None:
    model = _tiny()
    seen: list[int] = []
    update = Int8RoundTrip.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(layer_idx)
        keys, values = update(self, key_states, value_states, layer_idx)
        assert torch.equal(keys, fake_quantize_rows(key_states))
        assert not torch.equal(keys, key_states)
        return keys, values

    ids = torch.randint(0, 300, (1, 40))
    Int8RoundTrip.update = spy  # type: ignore[method-assign]
    try:
        with torch.inference_mode():
            logits = Int8KVModel(model)(input_ids=ids).logits
    finally:
        Int8RoundTrip.update = update  # type: ignore[method-assign]
    assert seen == [0, 1]
    with torch.inference_mode():
        base = model(input_ids=ids).logits
    assert 0 < float((logits - base).abs().max()) < 0.01


def test_compare_reports_a_small_positive_cost() -> None:
    model = _tiny()
    ids = torch.randint(0, 300, (256,))
    result = compare(model, Int8KVModel(model), ids, 64)
    assert result.windows == 4 and result.predictions == 4 * 63
    assert 0 < result.kl < 1e-3
    assert result.top1 > 0.95
    assert abs(result.perplexity / result.base_perplexity - 1) < 0.01

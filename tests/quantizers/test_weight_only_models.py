"""Whole tiny models quantised with int8 / int4: logits stay close to float."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from quantizers import quantize
from quantizers.runtime import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from quantizers.runtime.embedding import Int8Embedding
from quantizers.serialization import build_from_state, quantized_state
from tests.quantizers.conftest import tiny_llama_config


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def test_int8_model_logits_track_float(tiny_llama: nn.Module, tiny_tokens: torch.Tensor) -> None:
    reference = logits(tiny_llama, tiny_tokens)
    report = quantize(tiny_llama, "int8")
    out = logits(tiny_llama, tiny_tokens)
    kinds = {type(m) for m in tiny_llama.modules()}
    assert Int8WeightOnlyLinear in kinds and nn.Linear not in kinds  # lm_head too
    assert relative_error(out, reference) < 0.03
    assert (out.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    # every matrix in int8, the tied one once: about a quarter of float32
    assert report.weight_bytes_after < 0.27 * report.weight_bytes_before


@pytest.mark.parametrize(("group_size", "bound"), [(32, 0.15), (64, 0.2), (128, 0.25)])
def test_int4_model_logits_track_float(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor, group_size: int, bound: float
) -> None:
    reference = logits(tiny_llama, tiny_tokens)
    quantize(tiny_llama, "int4", {"group_size": group_size})
    out = logits(tiny_llama, tiny_tokens)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, Int4WeightOnlyLinear)
    assert relative_error(out, reference) < bound


def test_int4_error_shrinks_with_the_group_size(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor
) -> None:
    reference = logits(tiny_llama, tiny_tokens)
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    errors = []
    for group_size in (32, 128):
        model = type(tiny_llama)(tiny_llama.config).eval()
        model.load_state_dict(state)
        quantize(model, "int4", {"group_size": group_size})
        errors.append(relative_error(logits(model, tiny_tokens), reference))
    assert errors[0] < errors[1]


def test_generation_runs_on_a_quantised_model(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor
) -> None:
    quantize(tiny_llama, "int4", {"group_size": 32})
    with torch.no_grad():
        out = tiny_llama.generate(tiny_tokens[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, tiny_tokens.shape[1] + 5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_default_tied_lm_head_shares_int8_codes_with_the_embedding(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor, method: str
) -> None:
    reference = logits(tiny_llama, tiny_tokens)
    without = type(tiny_llama)(tiny_llama.config).eval()
    without.load_state_dict(tiny_llama.state_dict())
    plain = quantize(without, method, {"skip": ["*embed_tokens*", "*norm*", "lm_head"]})
    assert isinstance(without.lm_head, nn.Linear)
    report = quantize(tiny_llama, method)
    head, embedding = tiny_llama.lm_head, tiny_llama.model.embed_tokens
    assert isinstance(head, Int8WeightOnlyLinear) and isinstance(embedding, Int8Embedding)
    assert head.weight is embedding.weight and head.scale is embedding.scale
    assert head.weight.dtype == torch.int8
    assert report.layers["lm_head"]["tied_embedding"] is True
    # the shared matrix is stored once, in int8 (+ a bf16 scale per row)
    # instead of bfloat16: exactly vocab x (hidden - 2) bytes fewer
    vocab, hidden = embedding.weight.shape
    assert plain.weight_bytes_after - report.weight_bytes_after == vocab * (hidden - 2)
    bound = 0.05 if method == "int8" else 0.25
    assert relative_error(logits(tiny_llama, tiny_tokens), reference) < bound
    expected = logits(tiny_llama, tiny_tokens)
    tensors, plan = quantized_state(tiny_llama)
    assert plan["tie_word_embeddings"] == "int8" and "lm_head" not in plan["modules"]
    assert not any(name.startswith("lm_head.") for name in tensors)
    rebuilt = build_from_state(tiny_llama.config, tensors, plan)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    assert torch.equal(logits(rebuilt, tiny_tokens), expected)


def test_int4_gives_an_untied_output_head_int8(tiny_tokens: torch.Tensor) -> None:
    """An untied head is its own matrix, so int8 costs one layer's bytes; its
    error lands directly on every logit, so int4 keeps it at 8 bits."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    reference = logits(model, tiny_tokens)
    report = quantize(model, "int4", {"group_size": 32})
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert "tied_embedding" not in report.layers["lm_head"]
    embedding = model.model.embed_tokens
    assert type(embedding) is nn.Embedding and embedding.weight.dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4WeightOnlyLinear)
    assert relative_error(logits(model, tiny_tokens), reference) < 0.15

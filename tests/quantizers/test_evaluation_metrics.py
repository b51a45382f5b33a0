"""Perplexity, KL / top-1, sizes and decode speed on a tiny random Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from quantizers import quantize
from quantizers.evaluation import (
    compare,
    decode_speed,
    greedy_decode,
    linear_weight_counts,
    perplexity,
    quality_report,
    size_report,
    split_windows,
)
from tests.quantizers.conftest import tiny_llama_config
from tests.quantizers.evaluation_helpers import tiny_tokenizer


@pytest.fixture
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=300)).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (3 * 16 + 5,), generator=torch.Generator().manual_seed(2))


def _hand_cross_entropy(model: LlamaForCausalLM, ids: torch.Tensor, window: int) -> float:
    """Mean of -log softmax(logits)[next token], written out term by term."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - window + 1, window):
            chunk = ids[start : start + window]
            logits = model(input_ids=chunk.unsqueeze(0)).logits[0].double()
            for pos in range(window - 1):
                row = logits[pos]
                total += (torch.logsumexp(row, 0) - row[chunk[pos + 1]]).item()
                count += 1
    return total / count


def test_perplexity_is_exp_of_hand_computed_cross_entropy(model, ids) -> None:
    result = perplexity(model, ids, window=16)
    assert result.windows == 3
    assert result.tokens == 48
    assert result.predictions == 45
    assert result.perplexity == pytest.approx(math.exp(_hand_cross_entropy(model, ids, 16)),
                                              rel=1e-5)


def test_split_windows_drops_the_tail_and_rejects_bad_windows(ids) -> None:
    windows = split_windows(ids, 16)
    assert [w.shape for w in windows] == [torch.Size([1, 16])] * 3
    assert torch.equal(torch.cat([w[0] for w in windows]), ids[:48])
    with pytest.raises(ValueError, match="at least 2"):
        split_windows(ids, 1)
    with pytest.raises(ValueError, match="do not fill"):
        split_windows(ids[:10], 16)


def test_model_against_itself_has_zero_kl_and_full_agreement(model, ids) -> None:
    twin = copy.deepcopy(model)
    result = compare(model, twin, ids, window=16)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1 == 1.0
    assert result.perplexity == pytest.approx(result.base_perplexity, rel=1e-6)
    same = compare(model, model, ids, window=16)
    assert same.kl == 0.0
    assert same.top1 == 1.0
    assert same.perplexity == pytest.approx(perplexity(model, ids, 16).perplexity, rel=1e-6)


def test_kl_against_a_perturbed_copy_matches_torch_kl_div(model, ids) -> None:
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.2 * parameter.std() * torch.randn(parameter.shape,
                                                               generator=generator))
    result = compare(model, perturbed, ids, window=16)
    expected, agree = 0.0, 0
    with torch.no_grad():
        for window in split_windows(ids, 16):
            p = torch.log_softmax(model(input_ids=window).logits[0, :-1].double(), -1)
            q = torch.log_softmax(perturbed(input_ids=window).logits[0, :-1].double(), -1)
            expected += torch.nn.functional.kl_div(q, p, log_target=True,
                                                   reduction="sum").item()
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
    assert result.kl > 1e-3
    assert result.kl == pytest.approx(expected / result.predictions, rel=1e-4)
    assert result.top1 == agree / result.predictions
    assert result.top1 < 1.0


def test_quality_report_of_int8_copy_is_close_to_float_and_smaller(model) -> None:
    tokenizer = tiny_tokenizer()
    quant = copy.deepcopy(model)
    quantize(quant, "int8")
    report = quality_report(model, quant, tokenizer, limit_tokens=128, window=32)
    assert report["tokens"] == 128
    assert report["window"] == 32
    assert report["windows"] == 4
    assert report["ratio"] == pytest.approx(report["perplexity"] / report["base_perplexity"])
    assert 0.9 < report["ratio"] < 1.1
    assert 0.0 < report["kl"] < 0.05
    assert report["top1"] > 0.8
    assert report["weight_bytes"] < report["base_weight_bytes"]


def test_size_report_counts_linear_bits_without_the_tied_head(model) -> None:
    counts = linear_weight_counts(model)
    assert "lm_head" not in counts
    assert len(counts) == 2 * 7
    params = sum(p.numel() for p in model.parameters())
    float_size = size_report(model, counts, params)
    assert float_size.bits_per_weight_linear == 32.0
    assert float_size.bits_per_weight == pytest.approx(32.0, rel=1e-2)  # + rotary buffer
    assert float_size.linear_weights == sum(counts.values())
    quantize(model, "int8")
    int8_size = size_report(model, counts, params)
    assert 8.0 < int8_size.bits_per_weight_linear < 9.0
    assert int8_size.weight_bytes < float_size.weight_bytes / 2
    assert int8_size.bits_per_weight == 8 * int8_size.weight_bytes / params


def test_greedy_decode_with_cache_matches_full_recompute(model) -> None:
    prompt = torch.tensor([[5, 17, 42, 7]])
    tokens, seconds = greedy_decode(model, prompt, 6)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            step = model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, step], dim=1)
    assert torch.equal(tokens, expected[:, 4:])
    assert seconds > 0


def test_decode_speed_reports_its_conditions(model) -> None:
    speed = decode_speed(model, torch.tensor([[1, 2, 3]]), new_tokens=5, repeats=2)
    assert speed.tokens_per_second > 0
    assert (speed.new_tokens, speed.prompt_tokens, speed.repeats) == (5, 3, 2)
    assert speed.threads == torch.get_num_threads()
    with pytest.raises(ValueError):
        decode_speed(model, torch.tensor([[1]]), new_tokens=1)

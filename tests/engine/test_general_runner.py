"""The general runner against transformers' own forward and `generate`, per architecture.

Tiny random models (float32) of eight families; the pool's blocks are
interleaved between sequences so that gathering by block table is exercised.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from quantizers.loading import LoadedModel, load_model
from server.engine.hf_runner import GeneralRunner
from server.engine.kv_cache import KVCache
from server.engine.runner_choice import choose_runner
from tests.engine.paged import scratch_cache
from tests.helpers.tiny_architectures import ARCHITECTURES, EOS_ID, write_tiny_architecture

PROMPTS = [list(range(40, 60)), [7, 8, 9]]  # the first is past gemma3_text's window of 6
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory = tmp_path_factory.mktemp(request.param)
    return load_model(write_tiny_architecture(directory, request.param))


def _expected(model_dir: Path, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation, on the model as transformers loads it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=EOS_ID,
        )
    return out[0, len(prompt) :].tolist()


def _greedy(
    runner: GeneralRunner, cache: KVCache, tables: list[list[int]], prompts: list[list[int]]
) -> list[list[int]]:
    """Greedy decoding of `prompts` together, each prefilled alone, then batched decode."""
    tokens = [
        int(runner.prefill(cache, t, p)[-1].argmax()) for t, p in zip(tables, prompts, strict=True)
    ]
    positions = [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(NEW_TOKENS):
        for seq, token in zip(out, tokens, strict=True):
            seq.append(token)
        logits = runner.decode(cache, torch.tensor(tokens), positions, tables)
        tokens = logits.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    return out


def test_greedy_alone_and_batched_equals_generate(loaded: LoadedModel) -> None:
    runner = GeneralRunner(loaded.model)
    cache, tables = scratch_cache(runner, 2, len(PROMPTS[0]) + NEW_TOKENS + 1)
    expected = [_expected(loaded.source, p) for p in PROMPTS]
    alone = [_greedy(runner, cache, [tables[i]], [p])[0] for i, p in enumerate(PROMPTS)]
    assert alone == expected
    assert _greedy(runner, cache, tables, PROMPTS) == expected


def test_prefill_after_a_cached_prefix_equals_one_from_scratch(loaded: LoadedModel) -> None:
    """In aligned chunks, a prefill after a cached prefix computes exactly what
    a prefill from scratch does, and both match the model's own forward."""
    runner = GeneralRunner(loaded.model)
    prompt = PROMPTS[0]
    cache, tables = scratch_cache(runner, 2, len(prompt))
    scratch = runner.prefill(cache, tables[1], prompt, chunk=8, all_logits=True)
    runner.prefill(cache, tables[0], prompt[:8])
    tail = runner.prefill(cache, tables[0], prompt, start=8, chunk=8, all_logits=True)
    assert torch.equal(tail, scratch[8:])
    with torch.inference_mode():
        full = loaded.model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(scratch, full, rtol=1e-4, atol=1e-4)
    last = runner.prefill(cache, tables[0], prompt)
    torch.testing.assert_close(last, full[-1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple"):
        runner.prefill(cache, tables[0], prompt, start=5, chunk=8)


def test_float_weights_are_laid_column_major_with_the_same_values(loaded: LoadedModel) -> None:
    model = copy.deepcopy(loaded.model)
    linears = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear
    }
    ids = torch.tensor([PROMPTS[0]])
    embedded = model.get_input_embeddings()(ids)
    GeneralRunner(model)
    for name, weight in linears.items():
        now = model.get_submodule(name).weight
        assert now.t().is_contiguous() and torch.equal(now, weight), name
    assert torch.equal(model.get_input_embeddings()(ids), embedded)


def test_kv_spec_matches_the_configuration(loaded: LoadedModel) -> None:
    config = loaded.model.config
    spec = GeneralRunner(loaded.model).kv_spec
    heads = config.num_attention_heads
    assert spec.layers == config.num_hidden_layers
    assert spec.kv_heads == (getattr(config, "num_key_value_heads", None) or heads)
    assert spec.head_dim == (getattr(config, "head_dim", None) or config.hidden_size // heads)
    assert spec.dtype == torch.float32


def test_the_lean_runner_serves_only_the_llama_families_without_a_short_window() -> None:
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
        )
    )
    assert choose_runner(llama, 512).path == "lean"
    mistral = AutoModelForCausalLM.from_config(
        MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            sliding_window=128,
        )
    )
    assert choose_runner(mistral, 128).path == "lean"
    windowed = choose_runner(mistral, 512)
    assert windowed.path == "general" and "sliding window of 128" in windowed.reason


def test_every_other_family_takes_the_general_path(loaded: LoadedModel) -> None:
    choice = choose_runner(loaded.model, 512)
    lean = loaded.model.config.model_type == "llama"
    assert choice.path == ("lean" if lean else "general")
    if not lean:
        assert repr(loaded.model.config.model_type) in choice.reason

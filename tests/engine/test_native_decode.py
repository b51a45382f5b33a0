"""The native decode step (quantizers/kernels/decoder.cpp) against the eager one.

Its sums run in other orders than torch's kernels, so its logits match the
eager step's to bf16 rounding, not bit for bit; what must hold exactly is that
a row's numbers do not depend on its batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantizers import kernels, quantize
from quantizers.lora.peft_format import read_adapter
from server.engine.kv_cache import KVCache
from server.engine.llama_runner import LlamaRunner
from server.engine.served_model import ServedModel
from tests.engine.conftest import make_loaded
from tests.engine.paged import scratch_cache
from tests.engine.test_prepared import _model, qwen2_model
from tests.helpers.lora_adapters import save_random_adapter

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the kernels")

PROMPTS = [[5, 17, 99, 3, 42, 7], [8, 1], [250, 251, 252, 11, 60, 61, 62, 63, 64]]
# Fed to every sequence at each step, whatever either path would pick: both
# paths see the same inputs.
FORCED = [[1, 2, 3], [40, 41, 42], [7, 7, 7], [199, 5, 90]]


def _partial_groups() -> nn.Module:
    """Inputs of 192 and 320 with int4 groups of 128: each projection's last
    group is partial (SmolLM2's 576 = 4 x 128 + 64 is this case)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, vocab_size=300, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.5,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    quantize(model, "int4", {"group_size": 128})
    return model


def _decode_logits(runner: LlamaRunner) -> list[torch.Tensor]:
    cache, tables = scratch_cache(runner, len(PROMPTS), 16)
    for table, prompt in zip(tables, PROMPTS, strict=True):
        runner.prefill(cache, table, prompt)
    positions = [len(p) for p in PROMPTS]
    steps = []
    for tokens in FORCED:
        steps.append(runner.decode(cache, torch.tensor(tokens), positions, tables))
        positions = [p + 1 for p in positions]
    return steps


MODELS = {
    "bf16": lambda: _model("bfloat16", None, None),
    "int8": lambda: _model("bfloat16", "int8", None),
    "int4": lambda: _model("bfloat16", "int4", {"group_size": 64}),
    "int4-partial-group": _partial_groups,
    # Moderate q biases: large ones make attention so sharp that bf16 rounding
    # alone moves the eager step's logits 7% from float32's.
    "qwen2-bf16": lambda: qwen2_model(None, bias_std=0.2),
    "qwen2-int8": lambda: qwen2_model("int8", bias_std=0.2),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_native_step_matches_the_eager_step(name: str) -> None:
    model = MODELS[name]()
    native = LlamaRunner(copy.deepcopy(model), max_seq_len=64)
    eager = LlamaRunner(copy.deepcopy(model), max_seq_len=64, native=False)
    assert native.native is not None, native.native_unsupported
    assert eager.native is None
    got_steps, want_steps = _decode_logits(native), _decode_logits(eager)
    for got, want in zip(got_steps, want_steps, strict=True):
        spread = want.abs().max()
        # bf16 rounding of the activations, compounded over two layers.
        assert (got - want).abs().max() <= 0.05 * spread
        # Native's pick is the eager pick or a near-tie of it.
        picked = want.gather(-1, got.argmax(-1, keepdim=True))[:, 0]
        assert ((want.max(-1).values - picked) <= 0.05 * spread).all()
    if name.endswith("bf16"):
        # On average as close to the float32 model as the eager bf16 step is.
        exact = torch.cat(_decode_logits(LlamaRunner(model.float(), max_seq_len=64)))
        native_error = (torch.cat(got_steps) - exact).abs().mean()
        eager_error = (torch.cat(want_steps) - exact).abs().mean()
        assert native_error <= 1.25 * eager_error


def test_native_rows_do_not_depend_on_their_batch() -> None:
    model = _model("bfloat16", "int8", None)
    runner = LlamaRunner(model, max_seq_len=64)
    assert runner.native is not None
    batched = _decode_logits(runner)
    cache, tables = scratch_cache(runner, len(PROMPTS), 16)
    for row, (table, prompt) in enumerate(zip(tables, PROMPTS, strict=True)):
        runner.prefill(cache, table, prompt)
        for step, tokens in enumerate(FORCED):
            alone = runner.decode(cache, torch.tensor(tokens[row : row + 1]),
                                  [len(prompt) + step], [table])
            assert torch.equal(alone[0], batched[step][row])


@pytest.mark.parametrize("method", [None, "int8"])
def test_a_second_runner_over_the_installed_parts_runs_natively_too(method: str | None) -> None:
    """A swap to the same model builds a runner over the fused parts the first
    one installed: it reads the same fused weights and computes the same bits."""
    model = _model("bfloat16", method, None)
    first = LlamaRunner(model, max_seq_len=64)
    second = LlamaRunner(model, max_seq_len=64)
    assert first.native is not None and second.native is not None, second.native_unsupported
    for a, b in zip(_decode_logits(first), _decode_logits(second), strict=True):
        assert torch.equal(a, b)


def test_models_the_native_step_does_not_serve_decode_eagerly() -> None:
    float32 = LlamaRunner(make_loaded().model, max_seq_len=16)
    assert float32.native is None and float32.native_unsupported == "not bf16"
    model = _model("bfloat16", None, None)
    quantize(model, "w8a8-dynamic")
    w8a8 = LlamaRunner(model, max_seq_len=16)
    assert w8a8.native is None and "without a native kernel" in w8a8.native_unsupported


def test_served_models_say_how_they_decode() -> None:
    """The warm-up log and the engine's stats name the decode mode."""
    native = ServedModel(make_loaded(dtype=torch.bfloat16), max_num_seqs=1, max_model_len=32)
    eager = ServedModel(make_loaded(), max_num_seqs=1, max_model_len=32)
    assert native.decode_mode == "native" and eager.decode_mode == "eager"


def test_an_int8_kv_cache_decodes_eagerly_with_the_same_tokens() -> None:
    model = _model("bfloat16", "int8", None)
    runner = LlamaRunner(model, max_seq_len=64)
    spec = runner.kv_spec
    int8_cache = KVCache(type(spec)(**{**spec.__dict__, "cache_dtype": "int8"}), 8, 16)
    plain_cache = KVCache(spec, 8, 16)
    assert runner.native is not None and not runner.native.serves(int8_cache)
    for cache in (int8_cache, plain_cache):
        runner.prefill(cache, [0, 1], PROMPTS[0])
    tokens = torch.tensor([3])
    via_int8 = runner.decode(int8_cache, tokens, [len(PROMPTS[0])], [[0, 1]])
    via_native = runner.decode(plain_cache, tokens, [len(PROMPTS[0])], [[0, 1]])
    assert via_int8.argmax() == via_native.argmax()


def _served_decode(model: nn.Module, adapter_dir: Path, native: bool) -> torch.Tensor:
    """Logits of one decode step of two sequences, the first on the adapter."""
    loaded = make_loaded()
    loaded.model = model
    served = ServedModel(loaded, max_num_seqs=2, max_model_len=64)
    assert (served.runner.native is not None) is True
    if not native:
        served.runner.native = None
    served.lora.apply([(1, read_adapter(adapter_dir))])
    cache, tables = scratch_cache(served.runner, 2, 16)
    for uid, table, prompt in zip((1, None), tables, PROMPTS, strict=False):
        served.lora.state.select([uid], single=True)
        served.runner.prefill(cache, table, prompt)
    served.lora.state.select([1, None], single=False)
    positions = [len(PROMPTS[0]), len(PROMPTS[1])]
    return served.runner.decode(cache, torch.tensor([4, 4]), positions, tables)


@pytest.mark.parametrize("method", [None, "int8"])
def test_native_step_adds_each_rows_adapter_delta(tmp_path: Path, method: str | None) -> None:
    base = make_loaded(dtype=torch.bfloat16).model
    if method is not None:
        quantize(base, method)
    save_random_adapter(make_loaded().model, tmp_path / "a", seed=3)
    native = _served_decode(copy.deepcopy(base), tmp_path / "a", native=True)
    eager = _served_decode(copy.deepcopy(base), tmp_path / "a", native=False)
    assert (native - eager).abs().max() <= 0.03 * eager.abs().max()
    # The adapter moved the first row: without its delta the rows would match
    # a base-only step.
    plain = LlamaRunner(copy.deepcopy(base), max_seq_len=64)
    cache, tables = scratch_cache(plain, 2, 16)
    for table, prompt in zip(tables, PROMPTS, strict=False):
        plain.prefill(cache, table, prompt)
    base_step = plain.decode(cache, torch.tensor([4, 4]), [len(PROMPTS[0]), len(PROMPTS[1])],
                             tables)
    assert torch.equal(native[1], base_step[1])
    assert (native[0] - base_step[0]).abs().max() > 10 * (native[0] - eager[0]).abs().max()

"""The prepared eager runner (fused q/k/v and gate/up, oneDNN-prepacked bf16
weights) computes exactly what the model's own modules compute, in float, bf16,
int8 and int4, at prefill and at batched decode. (The native decode step is
tested against this path in test_native_decode.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from quantizers import quantize
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from server.engine.llama_runner import LlamaRunner
from server.engine.projections import PackedLinear, Projection, can_prepack
from tests.engine.conftest import make_loaded
from tests.engine.paged import scratch_cache

VARIANTS = [
    ("float32", None, None),
    ("bfloat16", None, None),
    ("bfloat16", "int8", None),
    ("bfloat16", "int4", {"group_size": 64}),
]


def _wide_model(dtype: torch.dtype) -> nn.Module:
    """Every projection 64 or 128 outputs wide: the CPU int4 kernel packs output
    rows in blocks of 64, so narrower q/k/v cannot be concatenated."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=300, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.5,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def _model(dtype: str, method: str | None, config: dict | None, wide: bool = True) -> nn.Module:
    model = _wide_model(getattr(torch, dtype)) if wide else make_loaded(
        dtype=getattr(torch, dtype)
    ).model
    if method is not None:
        quantize(model, method, config)
    return model


def _steps(runner: LlamaRunner) -> list[torch.Tensor]:
    """Prefill three sequences of different lengths, then four batched decode steps."""
    prompts = [[5, 17, 99, 3, 42, 7], [8, 1], [250, 251, 252, 11]]
    cache, tables = scratch_cache(runner, len(prompts), 16)
    outputs = [
        runner.prefill(cache, table, p, all_logits=True)
        for table, p in zip(tables, prompts, strict=True)
    ]
    positions = [len(p) for p in prompts]
    tokens = torch.tensor([1, 2, 3])
    for _ in range(4):
        logits = runner.decode(cache, tokens, positions, tables)
        outputs.append(logits)
        tokens = logits.argmax(-1)
        positions = [p + 1 for p in positions]
    single = runner.decode(cache, tokens[:1], positions[:1], tables[:1])
    return [*outputs, single]


@pytest.mark.parametrize(("dtype", "method", "config"), VARIANTS)
def test_prepared_runner_is_exact(dtype: str, method: str | None, config: dict | None) -> None:
    model = _model(dtype, method, config)
    reference = LlamaRunner(model, max_seq_len=64, prepare=False)
    prepared = LlamaRunner(model, max_seq_len=64, native=False)
    assert all(p.prepared is not None for p in [*prepared.qkv, *prepared.gate_up])
    assert prepared.prepared_weight_bytes > 0
    assert reference.prepared_weight_bytes == 0
    for want, got in zip(_steps(reference), _steps(prepared), strict=True):
        assert torch.equal(want, got)


def test_int4_rows_that_do_not_concatenate_stay_unfused_and_exact() -> None:
    """k/v with 32 outputs: concatenated packed rows would compute garbage; the
    one-off exactness check must catch that and keep the modules separate."""
    model = _model("bfloat16", "int4", {"group_size": 32}, wide=False)
    reference = LlamaRunner(model, max_seq_len=64, prepare=False)
    prepared = LlamaRunner(model, max_seq_len=64, native=False)
    assert all(p.prepared is None for p in prepared.qkv)
    assert all(p.prepared is not None for p in prepared.gate_up)
    for want, got in zip(_steps(reference), _steps(prepared), strict=True):
        assert torch.equal(want, got)


def qwen2_model(method: str | None, bias_std: float = 1.0) -> nn.Module:
    """A tiny bf16 Qwen2 (q/k/v biases, q's drawn with `bias_std`), quantised
    with `method` unless None."""
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=300, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.5,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(std=bias_std)
    if method is not None:
        quantize(model, method)
    return model


@pytest.mark.parametrize("method", [None, "int8"])
def test_biased_qkv_fuse_exactly(method: str | None) -> None:
    """Qwen2 has q/k/v biases: they are concatenated with the weights."""
    model = qwen2_model(method)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    reference = LlamaRunner(model, max_seq_len=64, prepare=False)
    prepared = LlamaRunner(model, max_seq_len=64, native=False)
    assert all(p.prepared is not None for p in prepared.qkv)
    for want, got in zip(_steps(reference), _steps(prepared), strict=True):
        assert torch.equal(want, got)


@pytest.mark.skipif(
    not can_prepack(torch.zeros(1, dtype=torch.bfloat16)), reason="no oneDNN bf16 on this CPU"
)
def test_bf16_projections_are_prepacked_and_a_tied_head_beside_the_embedding() -> None:
    """A head tied to the embedding is packed but left in the model, since the
    embedding lookup still needs its plain weight: that copy is the extra."""
    model = _model("bfloat16", None, None)
    runner = LlamaRunner(model, max_seq_len=16, native=False)
    single = [*runner.o_proj, *runner.down, runner.lm_head]
    assert all(isinstance(p.prepared, PackedLinear) for p in [*runner.qkv, *single])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    head = model.lm_head.weight
    assert runner.prepared_weight_bytes == head.numel() * head.element_size()


def test_mixed_kinds_run_unfused_and_exact() -> None:
    torch.manual_seed(0)
    float_linear = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    int8_linear = Int8WeightOnlyLinear.from_float(nn.Linear(64, 16, bias=False))
    owner = nn.Module()
    owner.a, owner.b = int8_linear, float_linear
    projection = Projection([(owner, "a"), (owner, "b")], prepare=True, dtype=torch.bfloat16)
    assert projection.prepared is None
    assert owner.a is int8_linear and owner.b is float_linear
    x = torch.randn(3, 64).to(torch.bfloat16)
    a, b = projection(x)
    assert torch.equal(a, int8_linear(x))
    assert torch.equal(b, float_linear(x))


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_modules_run_unfused_and_exact(method: str) -> None:
    """bitsandbytes keeps its weight in an inner module, not in buffers that
    concatenate: its projections must stay separate (a fused copy computed 576
    outputs and was reshaped as 960 on SmolLM2)."""
    model = _model("bfloat16", method, None)
    reference = LlamaRunner(model, max_seq_len=64, prepare=False)
    prepared = LlamaRunner(model, max_seq_len=64, native=False)
    assert all(p.prepared is None for p in [*prepared.qkv, *prepared.gate_up])
    for want, got in zip(_steps(reference), _steps(prepared), strict=True):
        assert torch.equal(want, got)

"""Fixtures shared by the quantizers tests: a tiny random Llama and its inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A 2-layer Llama shaped like SmolLM2 in miniature (tied embeddings, GQA).

    hidden 96 is not a multiple of 64, so int4 with groups of 64 pads K, the
    same situation as SmolLM2's 576 with groups of 128.
    """
    settings: dict[str, object] = {
        "vocab_size": 256,
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A fresh, deterministic, float32 tiny Llama in eval mode."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    return model.eval()


@pytest.fixture
def tiny_tokens() -> torch.Tensor:
    """Two sequences of 24 token ids for the tiny Llama."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 24), generator=generator)

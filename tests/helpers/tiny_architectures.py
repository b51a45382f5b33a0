"""Tiny random models of several transformers architectures, saved as HF directories.

Each exercises what makes its family differ from Llama: Qwen3's q/k norms,
Gemma 3's scaled embeddings, sliding-window and global layers and logit
soft-capping, Phi-3's fused qkv and gate_up, GPT-2's Conv1D projections and
learned positions, GPT-NeoX's parallel attention/MLP and partial rotary,
OLMo 2's post-norms and q/k norms, Granite's multipliers. Weights are drawn
wider than the default init so that greedy decoding is decided by clear
margins, not by rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers.tiny_model_dir import byte_tokenizer

VOCAB = 300
EOS_ID = 256
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "eos_token_id": EOS_ID, "bos_token_id": EOS_ID,
    "pad_token_id": EOS_ID, "initializer_range": 0.1,
}
_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {**_LLAMA_LIKE, "tie_word_embeddings": True},
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16, "tie_word_embeddings": True},
    "gemma3_text": {
        **_LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention"],
        "final_logit_softcapping": 5.0, "tie_word_embeddings": True,
    },
    "phi3": {**_LLAMA_LIKE, "tie_word_embeddings": False},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "gpt_neox": {
        **_LLAMA_LIKE, "num_key_value_heads": 4, "use_parallel_residual": True,
        "rotary_pct": 0.5, "tie_word_embeddings": False,
    },
    "olmo2": {**_LLAMA_LIKE, "tie_word_embeddings": False},
    "granite": {
        **_LLAMA_LIKE, "embedding_multiplier": 4.0, "logits_scaling": 2.0,
        "residual_multiplier": 0.5, "attention_multiplier": 0.25, "tie_word_embeddings": True,
    },
}


# Like the real GPT-2, whose tokenizer has no chat template.
NO_CHAT_TEMPLATE = frozenset({"gpt2"})


def write_tiny_architecture(directory: Path, model_type: str, seed: int = 0) -> Path:
    """Save a 2-layer random `model_type` model and a byte tokenizer into `directory`."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **_COMMON, **ARCHITECTURES[model_type])
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(directory)
    tokenizer = byte_tokenizer()
    if model_type in NO_CHAT_TEMPLATE:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(directory)
    return directory

"""A tiny random Llama saved as a Hugging Face directory, to serve in tests.

A real server on SmolLM2 spends ~16 s loading it and every quantisation job
reloads it; the admin tests need many loads, so they serve this model instead:
the same architecture and code paths in a fraction of a second. Its tokenizer
is byte-level (every byte a token), built offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 64, vocab 300) and its tokenizer into `directory`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=256, bos_token_id=256, pad_token_id=256,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory

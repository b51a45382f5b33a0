"""Fixtures: a tiny random Llama with a byte-level BPE tokenizer built offline.

The tokenizer maps every byte to its own token, so multi-byte characters span
several tokens: exactly the case incremental detokenisation must get right.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quantizers.loading import LoadedModel
from server.engine import Engine

EOS = "<|endoftext|>"
VOCAB = 300


def build_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    tokenizer.add_special_tokens({"eos_token": EOS})
    tokenizer.pad_token = EOS
    return tokenizer


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=256,
        bos_token_id=256,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def make_loaded(seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return LoadedModel(
        model_id=f"tiny-{seed}",
        model=build_model(seed, dtype),
        tokenizer=build_tokenizer(),
        source=Path("tiny"),
        dtype=dtype,
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def loaded() -> LoadedModel:
    return make_loaded()


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    engine = Engine(loaded, max_num_seqs=8, max_model_len=512, max_queue=16, num_threads=1)
    engine.start()
    yield engine
    engine.shutdown(drain_timeout_s=5)

"""A tiny byte-level BPE tokenizer built offline, for the evaluation tests.

The evaluation code tokenises real WikiText-2 text, so its tests need a real
tokenizer whose ids fit a tiny random Llama's vocabulary.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model reads a tiny text and guesses the next token.",
    "Quantised weights save memory; perplexity says what they cost.",
]


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")

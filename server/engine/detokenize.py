"""Turn a growing list of token ids into text pieces that are safe to stream.

Decoding token by token breaks multi-byte characters (a byte-level BPE token
may hold half of an emoji) and, for SentencePiece tokenizers, loses the
leading-space logic. So we decode a short window of recent tokens twice, with
and without the newest ones, and emit only the difference, and only once it no
longer ends in the replacement character that marks an incomplete sequence.
Each step therefore decodes a handful of tokens, not the whole output.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context so the first output token decodes with the
# spacing it would have in the full text.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of output tokens, holding back incomplete characters."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (may be empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of generation."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

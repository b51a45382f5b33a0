"""The WikiText-2 test text and its tokens, prepared the way the papers do it.

GPTQ, AWQ and SmoothQuant all score `"\\n\\n".join(rows)` of the Hugging Face
`wikitext-2-raw-v1` test split, whose rows are the raw file's lines (each
keeping its newline, blank lines as empty rows), tokenised once as a single
text. Reproducing that exactly is what makes our figures comparable with theirs.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from quantizers.datasets import data_file

WIKITEXT_RELATIVE = Path("wikitext-2-raw") / "wiki.test.raw"


class EvaluationDataError(FileNotFoundError):
    """The evaluation text is missing or empty; the message names the path."""


def wikitext_path() -> Path:
    return data_file(WIKITEXT_RELATIVE)


def join_rows(raw: str) -> str:
    """Rows as the HF dataset builds them (a line with its newline, blank lines
    empty), joined with a blank line as in the papers' evaluation code."""
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def wikitext_text() -> str:
    return _read_joined(wikitext_path())


@lru_cache(maxsize=2)
def _read_joined(source: Path) -> str:
    if not source.is_file():
        raise EvaluationDataError(f"WikiText-2 test file not found: {source}")
    raw = source.read_text(encoding="utf-8")
    if not raw.strip():
        raise EvaluationDataError(f"WikiText-2 test file is empty: {source}")
    return join_rows(raw)


# Tokens at the end of a tokenised prefix that may differ from the full text's
# tokenisation (the cut can split the last word); far more than one word needs.
PREFIX_MARGIN = 64
# Characters tokenised per wanted token on the first try (English BPE: ~4).
CHARS_PER_TOKEN = 8

# Per tokenizer object: (source file, tokens that match the full tokenisation,
# whether they are the whole text).
_TOKEN_CACHE: weakref.WeakKeyDictionary[Any, tuple[Path, torch.Tensor, bool]] = (
    weakref.WeakKeyDictionary()
)


def _tokenise(tokenizer: Any, text: str, limit_tokens: int | None) -> tuple[torch.Tensor, bool]:
    """Tokens of the whole text, or of a prefix long enough that its first
    `limit_tokens` tokens equal the whole text's (the last PREFIX_MARGIN
    tokens of a prefix are dropped, since the cut may have split a word)."""
    chars = len(text) if limit_tokens is None else (limit_tokens + PREFIX_MARGIN) * CHARS_PER_TOKEN
    while True:
        ids = torch.tensor(tokenizer(text[:chars])["input_ids"], dtype=torch.long)
        if chars >= len(text):
            return ids, True
        if ids.numel() >= limit_tokens + PREFIX_MARGIN:
            return ids[:-PREFIX_MARGIN], False
        chars *= 2


def wikitext_tokens(tokenizer: Any, limit_tokens: int | None = None) -> torch.Tensor:
    """The test text tokenised as one text (1-D LongTensor), cut to its first
    `limit_tokens` tokens when given.

    Quick runs only tokenise a prefix of the text, which yields exactly the
    first tokens of the full tokenisation. The server's job report calls this
    after every quantisation, so tokens are kept per tokenizer object for the
    life of the process.
    """
    source = wikitext_path()
    cached = _TOKEN_CACHE.get(tokenizer)
    usable = cached is not None and cached[0] == source and (
        cached[2] or (limit_tokens is not None and cached[1].numel() >= limit_tokens)
    )
    if usable:
        ids = cached[1]
    else:
        ids, complete = _tokenise(tokenizer, _read_joined(source), limit_tokens)
        _TOKEN_CACHE[tokenizer] = (source, ids, complete)
    return ids if limit_tokens is None else ids[:limit_tokens]

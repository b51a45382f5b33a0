"""The texts a variant is scored on: WikiText-2 test for reported figures, and
a held-out validation text on which method defaults are chosen.

Tuning a default on the split that is then reported would make the reported
figure optimistic, so the two never mix: defaults are chosen on `validation`
(Alice's Adventures in Wonderland, bundled, never the default calibration text,
tinyshakespeare), and only `wikitext` figures are published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantizers.datasets import data_file
from quantizers.evaluation.wikitext import wikitext_tokens

WIKITEXT = "wikitext"
VALIDATION = "validation"
TEXTS = (WIKITEXT, VALIDATION)
VALIDATION_DATASET = "alice"
LABELS = {WIKITEXT: "WikiText-2 test", VALIDATION: "validation text (carroll-alice)"}
_VALIDATION_RELATIVE = Path("calibration") / "carroll-alice.txt"


def evaluation_tokens(tokenizer: Any, text: str, limit_tokens: int | None) -> torch.Tensor:
    """The tokens of `text` (one of TEXTS), cut to the first `limit_tokens`."""
    if text == WIKITEXT:
        return wikitext_tokens(tokenizer, limit_tokens)
    if text != VALIDATION:
        raise ValueError(f"unknown evaluation text {text!r}; choose from {TEXTS}")
    ids = torch.tensor(tokenizer(data_file(_VALIDATION_RELATIVE).read_text(encoding="utf-8"))
                       ["input_ids"], dtype=torch.long)
    return ids if limit_tokens is None else ids[:limit_tokens]

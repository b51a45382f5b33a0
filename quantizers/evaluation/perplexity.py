"""Perplexity over non-overlapping windows of one token stream.

The papers (GPTQ, AWQ, SmoothQuant) cut the tokenised test text into
consecutive windows of a fixed length, drop the incomplete tail, and score each
window independently from an empty context. Every position but the first in a
window predicts its next token, so a window of W tokens contributes W - 1
predictions; perplexity is exp(total negative log-likelihood / predictions).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Positions whose float32 log-softmax is materialised at once: with a 49152-token
# vocabulary a chunk of 128 is 25 MB, whatever the window length.
LOG_PROB_CHUNK = 128


def split_windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Consecutive [1, window] slices of a 1-D token tensor; the tail that does
    not fill a window is dropped, as in the papers."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    count = ids.numel() // window
    if count == 0:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {window}")
    return [ids[i * window : (i + 1) * window].unsqueeze(0) for i in range(count)]


@torch.inference_mode()
def window_logits(model: torch.nn.Module, window_ids: torch.Tensor) -> torch.Tensor:
    """Logits [W, vocab] for one window, in the model's own dtype.

    The full model forward is used (not the decoder plus the output embedding)
    so that any architecture-specific logit scaling is included.
    """
    device = next(model.parameters()).device
    out = model(input_ids=window_ids.to(device), use_cache=False)
    return out.logits[0]


def log_prob_chunks(
    logits: torch.Tensor, chunk: int = LOG_PROB_CHUNK
) -> Iterator[tuple[slice, torch.Tensor]]:
    """float32 log-probabilities of the predicting positions (all but the last),
    a slice of positions at a time so the float32 copy stays small."""
    predictions = logits.shape[0] - 1
    for start in range(0, predictions, chunk):
        rows = slice(start, min(start + chunk, predictions))
        yield rows, torch.log_softmax(logits[rows].float(), dim=-1)


def window_nll(logits: torch.Tensor, window_ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of a window's W - 1 next tokens."""
    targets = window_ids[0, 1:].to(logits.device)
    total = 0.0
    for rows, log_probs in log_prob_chunks(logits):
        total -= log_probs.gather(1, targets[rows].unsqueeze(1)).sum().item()
    return total


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity with what it was measured on, so no figure travels without
    its window length and token count."""

    perplexity: float
    nll: float
    predictions: int
    tokens: int
    windows: int
    window: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity_from_nll(nll: float, predictions: int) -> float:
    return math.exp(nll / predictions)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int) -> PerplexityResult:
    """Perplexity of `model` on the 1-D token tensor `ids` in windows of `window`."""
    chunks = split_windows(ids, window)
    nll = sum(window_nll(window_logits(model, w), w) for w in chunks)
    predictions = len(chunks) * (window - 1)
    return PerplexityResult(
        perplexity=perplexity_from_nll(nll, predictions),
        nll=nll,
        predictions=predictions,
        tokens=len(chunks) * window,
        windows=len(chunks),
        window=window,
    )

"""The quality report attached to a quantisation job.

The server calls this right after a quantisation finishes, with the float model
it quantised from, so it must be quick: by default it scores a short slice of
the WikiText-2 test text (`limit_tokens`), which is enough to catch a broken
quantisation and to rank methods, but is not the paper-comparable full-text
figure (that is `quantserve eval` with a larger slice). Every figure carries
its window length and token count.
"""

from __future__ import annotations

from typing import Any

import torch

from quantizers.evaluation.divergence import compare
from quantizers.evaluation.wikitext import wikitext_tokens
from quantizers.loading import weight_bytes

DEFAULT_LIMIT_TOKENS = 512
DEFAULT_WINDOW = 256


def quality_report(
    base_model: torch.nn.Module,
    quant_model: torch.nn.Module,
    tokenizer: Any,
    *,
    limit_tokens: int = DEFAULT_LIMIT_TOKENS,
    window: int = DEFAULT_WINDOW,
) -> dict[str, Any]:
    """Perplexity of both models, their ratio, mean KL and top-1 agreement of
    `quant_model` against `base_model` on the first `limit_tokens` WikiText-2
    test tokens in non-overlapping windows of `window`, and the weight bytes."""
    ids = wikitext_tokens(tokenizer, limit_tokens)
    result = compare(base_model, quant_model, ids, window)
    return {
        "dataset": "wikitext-2-raw test",
        "perplexity": result.perplexity,
        "base_perplexity": result.base_perplexity,
        "ratio": result.perplexity / result.base_perplexity,
        "kl": result.kl,
        "top1": result.top1,
        "weight_bytes": weight_bytes(quant_model),
        "base_weight_bytes": weight_bytes(base_model),
        "tokens": result.tokens,
        "predictions": result.predictions,
        "windows": result.windows,
        "window": window,
    }

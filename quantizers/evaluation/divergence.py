"""How far a quantised model's next-token distributions move from the original.

Perplexity only looks at the probability of the true next token; the mean KL
divergence KL(P_base || P_quant) over every predicted position and the top-1
agreement (same argmax) show changes in the whole distribution, which is what a
user sampling from the model sees. Both models score the same windows, one
window at a time, and the float32 log-softmax is built a few positions at a
time, so memory stays small despite the 49152-token vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from quantizers.evaluation.perplexity import (
    log_prob_chunks,
    perplexity_from_nll,
    split_windows,
    window_logits,
)


@dataclass(frozen=True)
class DivergenceResult:
    """KL, top-1 agreement and both perplexities, measured on the same tokens."""

    kl: float
    top1: float
    perplexity: float
    base_perplexity: float
    predictions: int
    tokens: int
    windows: int
    window: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def compare(
    base: torch.nn.Module, quant: torch.nn.Module, ids: torch.Tensor, window: int
) -> DivergenceResult:
    """Score `quant` against `base` on the windows of `ids`.

    When both are the same object the second forward pass is skipped: the
    answer (KL 0, agreement 1) is known, and the float row of a benchmark
    should not pay twice for it.
    """
    kl_sum = 0.0
    agree = 0
    nll_base = 0.0
    nll_quant = 0.0
    chunks = split_windows(ids, window)
    for window_ids in chunks:
        base_logits = window_logits(base, window_ids)
        quant_logits = (
            base_logits
            if quant is base
            else window_logits(quant, window_ids).to(base_logits.device)
        )
        targets = window_ids[0, 1:].unsqueeze(1).to(base_logits.device)
        quant_chunks = log_prob_chunks(quant_logits)
        for rows, base_lp in log_prob_chunks(base_logits):
            _, quant_lp = next(quant_chunks)
            kl_sum += (base_lp.exp() * (base_lp - quant_lp)).sum().item()
            agree += int((base_lp.argmax(-1) == quant_lp.argmax(-1)).sum().item())
            nll_base -= base_lp.gather(1, targets[rows]).sum().item()
            nll_quant -= quant_lp.gather(1, targets[rows]).sum().item()
    predictions = len(chunks) * (window - 1)
    return DivergenceResult(
        kl=kl_sum / predictions,
        top1=agree / predictions,
        perplexity=perplexity_from_nll(nll_quant, predictions),
        base_perplexity=perplexity_from_nll(nll_base, predictions),
        predictions=predictions,
        tokens=len(chunks) * window,
        windows=len(chunks),
        window=window,
    )

"""Calibrated methods (GPTQ, feedback, mixed, W8A8, SmoothQuant) against RTN, in one process.

`quantserve eval` measures every method in its own worker (load, serving peak,
decode speed, ...) and scores the float model again for each. This script
measures only what the calibrated methods are judged on — WikiText-2
perplexity, KL and top-1 against the float model, linear-layer bits per
weight and quantisation time — loading the model once, scoring the float
model once (its logits kept in bf16) and copying it per variant, so a run fits
on a busy 2-core machine. Every variant is scored on the same tokens in the
same run, with the same window functions as `quantserve eval`.

    python bench/calibrated_methods.py --limit-tokens 8192 --calibration-samples 32
    python bench/calibrated_methods.py --threads 1 --only w8a8-dynamic,w8a8-static,smoothquant
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from quantizers.calibration import CalibrationConfig, calibration_batches
from quantizers.evaluation.machine import describe_machine
from quantizers.evaluation.perplexity import (
    log_prob_chunks,
    perplexity_from_nll,
    split_windows,
    window_logits,
    window_nll,
)
from quantizers.evaluation.size import linear_weight_counts, size_report
from quantizers.evaluation.wikitext import wikitext_tokens
from quantizers.loading import load_model
from quantizers.registry import quantize

VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("int8", "int8", {}),
    ("int4 g128 (RTN)", "int4", {"group_size": 128}),
    ("gptq int4 g128", "gptq", {"bits": 4, "group_size": 128}),
    ("feedback on int4 g128", "feedback", {"start": {"method": "int4"}}),
    ("mixed 5.0 bpw", "mixed", {"target_bits_per_weight": 5.0}),
    ("mixed 6.0 bpw", "mixed", {"target_bits_per_weight": 6.0}),
    ("w8a8-dynamic", "w8a8-dynamic", {}),
    ("w8a8-static", "w8a8-static", {}),
    ("smoothquant", "smoothquant", {}),
    ("smoothquant static", "smoothquant", {"activations": "static"}),
]


class FloatReference:
    """The float model's logits on every evaluation window, computed once."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, window: int) -> None:
        self.windows = split_windows(ids, window)
        with torch.inference_mode():
            self.logits = [window_logits(model, w).to(torch.bfloat16) for w in self.windows]
        self.perplexity = self.score_nll(self.logits)

    def score_nll(self, logits: list[torch.Tensor]) -> float:
        nll = sum(window_nll(lg, w) for lg, w in zip(logits, self.windows, strict=True))
        return perplexity_from_nll(nll, sum(w.shape[1] - 1 for w in self.windows))

    @torch.inference_mode()
    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """Perplexity, mean KL(float ‖ model) and top-1 agreement of `model`."""
        nll = kl = 0.0
        agree = predictions = 0
        for base_logits, window_ids in zip(self.logits, self.windows, strict=True):
            logits = window_logits(model, window_ids)
            nll += window_nll(logits, window_ids)
            for (rows, base), (_, new) in zip(
                log_prob_chunks(base_logits), log_prob_chunks(logits), strict=True
            ):
                kl += float((base.exp() * (base - new)).sum())
                agree += int((base.argmax(-1) == new.argmax(-1)).sum())
                predictions += rows.stop - rows.start
        return {
            "perplexity": perplexity_from_nll(nll, predictions),
            "kl": kl / predictions,
            "top1": agree / predictions,
        }


def _row(
    name: str, seconds: float, size: Any, result: Any, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "variant": name,
        **result,
        "linear_bits_per_weight": size.bits_per_weight_linear,
        "weight_bytes": size.weight_bytes,
        "quantise_seconds": seconds,
        "extra": extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--only", default="", help="comma list of variant names to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args()
    print(f"Machine: {describe_machine(args.threads or None)}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(dtype="float32")
    base = loaded.model.eval()
    ids = wikitext_tokens(loaded.tokenizer, args.limit_tokens)
    calibration = calibration_batches(
        loaded.tokenizer,
        CalibrationConfig(
            dataset="tinyshakespeare",
            samples=args.calibration_samples,
            seq_len=args.calibration_seq_len,
        ),
    )
    counts = linear_weight_counts(base)
    params = sum(p.numel() for p in base.parameters())
    wanted = {v.strip() for v in args.only.split(",") if v.strip()}
    print(
        f"load {os.getloadavg()[0]:.1f}, threads {torch.get_num_threads()}, "
        f"{ids.numel()} eval tokens, window {args.window}, "
        f"calibration {args.calibration_samples} x {args.calibration_seq_len}",
        flush=True,
    )

    reference = FloatReference(base, ids, args.window)
    float_scores = {"perplexity": reference.perplexity, "kl": 0.0, "top1": 1.0}
    rows = [_row("float32", 0.0, size_report(base, counts, params), float_scores, {})]
    print(json.dumps(rows[-1]), flush=True)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    rows.append(_row("bf16", 0.0, size_report(bf16, counts, params), reference.score(bf16), {}))
    print(json.dumps(rows[-1]), flush=True)
    del bf16
    for name, method, config in VARIANTS:
        if wanted and name not in wanted:
            continue
        model = copy.deepcopy(base)
        started = time.perf_counter()
        report = quantize(model, method, config, calibration=calibration)
        seconds = time.perf_counter() - started
        result = reference.score(model)
        extra = {k: v for k, v in report.extra.items() if k != "mixed"}
        if "mixed" in report.extra:
            mixed = report.extra["mixed"]
            extra["mixed"] = {
                "widths": {str(b): list(mixed["plan"].values()).count(b) for b in (4, 8, 16)},
                "estimated_ppl_increase_pct": mixed["estimated_ppl_increase_pct"],
            }
        rows.append(_row(name, seconds, size_report(model, counts, params), result, extra))
        print(json.dumps(rows[-1]), flush=True)
        del model
    if args.output_json:
        args.output_json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

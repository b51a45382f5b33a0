"""The job quality report on the embedded SmolLM2: pins the WikiText-2
preparation (row joining, tokenisation, windows) to a known float perplexity
and checks that int8 stays within the project's +1% target."""

from __future__ import annotations

import copy

import pytest

from quantizers import quantize
from quantizers.evaluation import quality_report
from quantizers.loading import load_model

pytestmark = pytest.mark.slow

# float32 SmolLM2-135M-Instruct (from its Q4_1 GGUF), first 1024 WikiText-2
# test tokens in windows of 512, measured by `quantserve eval` on 2026-11-27.
FLOAT_PERPLEXITY_1024_512 = 28.233


def test_quality_report_on_smollm2_int8() -> None:
    lm = load_model(dtype="float32")
    same = quality_report(lm.model, lm.model, lm.tokenizer, limit_tokens=1024, window=512)
    assert same["base_perplexity"] == pytest.approx(FLOAT_PERPLEXITY_1024_512, rel=1e-3)
    assert (same["kl"], same["top1"], same["ratio"]) == (0.0, 1.0, 1.0)
    quant = copy.deepcopy(lm.model)
    quantize(quant, "int8")
    report = quality_report(lm.model, quant, lm.tokenizer)
    assert (report["tokens"], report["window"]) == (512, 256)
    assert report["ratio"] < 1.01
    assert report["kl"] < 0.02
    assert report["top1"] > 0.9
    assert report["weight_bytes"] < 0.35 * report["base_weight_bytes"]

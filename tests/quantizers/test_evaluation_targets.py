"""Target verdicts computed from benchmark rows."""

from __future__ import annotations

from typing import Any

from quantizers.evaluation.targets import check_targets, render_verdicts


def _row(label: str, method: str, ppl: float, size: int, tps: float = 10.0,
         **config: Any) -> dict[str, Any]:
    return {
        "label": label, "method": method, "config": config, "perplexity": ppl,
        "weight_bytes": size, "decode": {"tokens_per_second": tps},
        "float_decode_same_process": {"tokens_per_second": 10.0},
    }


def _verdicts(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    return {v.target: v.passed for v in check_targets(rows)}


def test_targets_pass_and_fail_on_the_measured_ratios() -> None:
    rows = [
        _row("float32", "float32", 20.0, 1000),
        _row("int8", "int8", 20.1, 260, tps=14.0),
        _row("int4", "int4", 30.0, 170, group_size=128),
        _row("w8a8-static", "w8a8-static", 22.0, 260),
        _row("smoothquant", "smoothquant", 20.5, 260),
        _row("gptq", "gptq", 25.0, 170, bits=4, group_size=128),
        _row("mixed a", "mixed", 21.0, 200),
        _row("mixed b", "mixed", 29.0, 200),
        {"label": "feedback", "method": "feedback", "config": None, "error": "failed"},
    ]
    verdicts = _verdicts(rows)
    assert verdicts["int8 weight bytes <= 0.27x float"] is True
    assert verdicts["int8 perplexity within +1% of float"] is True
    assert verdicts["int8 decode tokens/s >= 1.3x float"] is True
    assert verdicts["int4 g128 weight bytes <= 0.16x float"] is False
    assert verdicts["smoothquant perplexity within +3% of float"] is True
    assert verdicts["smoothquant perplexity below w8a8-static"] is True
    assert verdicts["gptq int4 g128 closes >= 40% of RTN int4 g128's perplexity gap"] is True
    assert verdicts["feedback strictly improves on its int4 g128 start"] is None
    assert verdicts["mixed a: mixed on or below the int4 g128 - int8 line"] is True
    assert verdicts["mixed b: mixed on or below the int4 g128 - int8 line"] is False


def test_qat_targets_judge_the_gap_the_other_methods_and_the_time() -> None:
    rows = [
        _row("float32", "float32", 20.0, 1000),
        _row("int4", "int4", 30.0, 170, group_size=128),
        _row("gptq", "gptq", 25.0, 170, bits=4, group_size=128),
        _row("feedback", "feedback", 21.5, 170),
        {**_row("qat", "qat", 21.9, 170, bits=4, group_size=128), "quant_seconds": 1300.0},
    ]
    verdicts = _verdicts(rows)
    assert verdicts["qat int4 g128 closes >= 80% of RTN int4 g128's perplexity gap"] is True
    assert verdicts["qat int4 g128 perplexity below gptq at no more bytes"] is True
    assert verdicts["qat int4 g128 perplexity below feedback at no more bytes"] is False
    assert verdicts["qat int4 g128 quantisation within 20 minutes"] is False


def test_unmeasured_targets_are_not_passed() -> None:
    verdicts = check_targets([_row("float32", "float32", 20.0, 1000),
                              _row("int4", "int4", 30.0, 100, group_size=64)])
    assert verdicts and all(v.passed is None for v in verdicts)
    assert "not measured" in render_verdicts(verdicts)
    assert check_targets([]) == []

"""The project's quality, size and speed targets, checked against one run.

Targets from the quantizers issue (int8, int4 g128, SmoothQuant) and the
smarter-quantisation issue (GPTQ, feedback, mixed precision) and the
quantisation-aware training issue (qat) are judged on the
rows of the same run, so the benchmark document states pass or fail next to
the figures instead of leaving the reader to compute ratios. A target whose
rows were not measured says so rather than passing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    passed: bool | None

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "not measured"}[self.passed]


def _find(rows: list[Row], method: str, **config: Any) -> Row | None:
    """The first measured row of `method` whose canonical config has `config`."""
    for row in rows:
        if "error" in row or row["method"] != method:
            continue
        given = row.get("config") or {}
        if all(given.get(key) == value for key, value in config.items()):
            return row
    return None


def _ratio(row: Row, base: Row, key: str) -> float:
    return row[key] / base[key]


def _decode_ratio(row: Row) -> float:
    return (row["decode"]["tokens_per_second"]
            / row["float_decode_same_process"]["tokens_per_second"])


def _int8(rows: list[Row], base: Row) -> list[Verdict]:
    row = _find(rows, "int8")
    if row is None:
        return [Verdict("int8: bytes <= 0.27x, ppl <= +1%, decode >= 1.3x", "", None)]
    size = _ratio(row, base, "weight_bytes")
    ppl = _ratio(row, base, "perplexity")
    speed = _decode_ratio(row)
    return [
        Verdict("int8 weight bytes <= 0.27x float", f"{size:.3f}x", size <= 0.27),
        Verdict("int8 perplexity within +1% of float", f"{ppl:.4f}x", ppl <= 1.01),
        Verdict("int8 decode tokens/s >= 1.3x float", f"{speed:.2f}x", speed >= 1.3),
    ]


def _int4(rows: list[Row], base: Row) -> list[Verdict]:
    row = _find(rows, "int4", group_size=128)
    if row is None:
        return [Verdict("int4 g128 weight bytes <= 0.16x float", "", None)]
    size = _ratio(row, base, "weight_bytes")
    return [Verdict("int4 g128 weight bytes <= 0.16x float", f"{size:.3f}x", size <= 0.16)]


def _smoothquant(rows: list[Row], base: Row) -> list[Verdict]:
    smooth, static = _find(rows, "smoothquant"), _find(rows, "w8a8-static")
    if smooth is None:
        return [Verdict("smoothquant perplexity within +3% of float and below w8a8-static",
                        "", None)]
    ppl = _ratio(smooth, base, "perplexity")
    verdicts = [Verdict("smoothquant perplexity within +3% of float", f"{ppl:.4f}x", ppl <= 1.03)]
    if static is None:
        verdicts.append(Verdict("smoothquant perplexity below w8a8-static", "", None))
    else:
        verdicts.append(Verdict(
            "smoothquant perplexity below w8a8-static",
            f"{smooth['perplexity']:.3f} vs {static['perplexity']:.3f}",
            smooth["perplexity"] < static["perplexity"],
        ))
    return verdicts


def _gptq(rows: list[Row], base: Row) -> list[Verdict]:
    gptq = _find(rows, "gptq", bits=4, group_size=128)
    rtn = _find(rows, "int4", group_size=128)
    name = "gptq int4 g128 closes >= 40% of RTN int4 g128's perplexity gap"
    if gptq is None or rtn is None:
        return [Verdict(name, "", None)]
    closed = _gap_closed(gptq, rtn, base)
    return [Verdict(name, f"{closed:.0%} closed", closed >= 0.4)]


def _gap_closed(row: Row, rtn: Row, base: Row) -> float:
    """The share of RTN's perplexity gap to float that `row` closes (0 without a gap)."""
    gap = rtn["perplexity"] - base["perplexity"]
    return (rtn["perplexity"] - row["perplexity"]) / gap if gap > 0 else 0.0


def _feedback(rows: list[Row], base: Row) -> list[Verdict]:
    feedback, rtn = _find(rows, "feedback"), _find(rows, "int4", group_size=128)
    name = "feedback strictly improves on its int4 g128 start"
    if feedback is None or rtn is None:
        return [Verdict(name, "", None)]
    return [Verdict(name, f"{feedback['perplexity']:.3f} vs {rtn['perplexity']:.3f}",
                    feedback["perplexity"] < rtn["perplexity"])]


def _mixed(rows: list[Row], base: Row) -> list[Verdict]:
    """Each mixed row against the straight line from int4 g128 to int8 in the
    (bytes, perplexity) plane: on or below it means better than mixing uniformly."""
    int4, int8 = _find(rows, "int4", group_size=128), _find(rows, "int8")
    mixed = [r for r in rows if "error" not in r and r["method"] == "mixed"]
    name = "mixed on or below the int4 g128 - int8 line"
    if not mixed or int4 is None or int8 is None:
        return [Verdict(name, "", None)]
    verdicts = []
    for row in mixed:
        share = (row["weight_bytes"] - int4["weight_bytes"]) / (
            int8["weight_bytes"] - int4["weight_bytes"])
        line = int4["perplexity"] + share * (int8["perplexity"] - int4["perplexity"])
        verdicts.append(Verdict(f"{row['label']}: {name}",
                                f"{row['perplexity']:.3f} vs line {line:.3f}",
                                row["perplexity"] <= line))
    return verdicts


# The quantisation-aware training issue's budget for one qat job, quantisation included.
QAT_SECONDS = 20 * 60


def _qat(rows: list[Row], base: Row) -> list[Verdict]:
    """qat int4 g128 against RTN's gap to float, and below GPTQ and feedback
    at the same bytes (the rows of the same group size)."""
    qat = _find(rows, "qat", bits=4, group_size=128)
    rtn = _find(rows, "int4", group_size=128)
    gap_name = "qat int4 g128 closes >= 80% of RTN int4 g128's perplexity gap"
    if qat is None or rtn is None:
        return [Verdict(gap_name, "", None)]
    closed = _gap_closed(qat, rtn, base)
    verdicts = [Verdict(gap_name, f"{closed:.0%} closed ({qat['perplexity']:.3f})",
                        closed >= 0.8)]
    others = [_find(rows, "gptq", bits=4, group_size=128), _find(rows, "feedback")]
    for name, other in zip(("gptq", "feedback"), others, strict=True):
        target = f"qat int4 g128 perplexity below {name} at no more bytes"
        if other is None:
            verdicts.append(Verdict(target, "", None))
            continue
        verdicts.append(Verdict(
            target, f"{qat['perplexity']:.3f} vs {other['perplexity']:.3f}",
            qat["perplexity"] < other["perplexity"]
            and qat["weight_bytes"] <= other["weight_bytes"],
        ))
    seconds = qat.get("quant_seconds")
    verdicts.append(Verdict(
        f"qat int4 g128 quantisation within {QAT_SECONDS // 60} minutes",
        "" if seconds is None else f"{seconds:.0f} s",
        None if seconds is None else seconds <= QAT_SECONDS,
    ))
    return verdicts


CHECKS: list[Callable[[list[Row], Row], list[Verdict]]] = [
    _int8, _int4, _smoothquant, _gptq, _feedback, _mixed, _qat,
]


def check_targets(rows: list[Row]) -> list[Verdict]:
    base = next((r for r in rows if r["label"] == "float32" and "error" not in r), None)
    if base is None:
        return []
    return [verdict for check in CHECKS for verdict in check(rows, base)]


def render_verdicts(verdicts: list[Verdict]) -> str:
    lines = ["| target | measured | result |", "|---|---:|---|"]
    lines += [f"| {v.target} | {v.measured or '—'} | {v.status} |" for v in verdicts]
    return "\n".join(lines)

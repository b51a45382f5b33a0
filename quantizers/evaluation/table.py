"""The benchmark table: one row per variant, ratios against float32.

Absolute timings on a shared 2-core machine drift from run to run; ratios
against the float32 row of the same run are what can be compared across runs,
so each cost column sits next to its ratio.
"""

from __future__ import annotations

from typing import Any

from quantizers.evaluation.texts import LABELS, WIKITEXT

MIB = 1024 * 1024

HEADER = (
    "| method | perplexity | ppl ×float | KL | top-1 | weight MiB | bytes ×float "
    "| bits/w linear | bits/w all | quant s | decode tok/s | decode ×float "
    "| peak RSS MiB | quant peak over float MiB |"
)
ALIGN = "|---|" + "---:|" * 13


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "n/a" if value is None or not base else f"{value / base:.3f}"


def _row(row: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Perplexity and bytes are compared with the float32 row; decode speed with
    float32 timed in turns in the variant's own process (see worker)."""
    label = row["label"]
    if "error" in row:
        status = "unavailable here" if is_unavailable(row) else "failed"
        message = " ".join(str(row["error"]).split()).replace("|", "\\|")[:300]
        return f"| {label} | {status}: {message} |" + " |" * 12
    tps = row["decode"]["tokens_per_second"]
    cells = [
        label,
        f"{row['perplexity']:.3f}",
        _ratio(row["perplexity"], base and base["perplexity"]),
        f"{row['kl']:.4f}",
        f"{row['top1']:.3f}",
        _mib(row["weight_bytes"]),
        _ratio(row["weight_bytes"], base and base["weight_bytes"]),
        f"{row['bits_per_weight_linear']:.2f}",
        f"{row['bits_per_weight']:.2f}",
        f"{row['quant_seconds']:.2f}",
        f"{tps:.1f}",
        _ratio(tps, row["float_decode_same_process"]["tokens_per_second"]),
        _mib(row["peak_rss_bytes"]),
        _mib(row["quant_peak_over_float_bytes"]),
    ]
    return "| " + " | ".join(cells) + " |"


def is_unavailable(row: dict[str, Any]) -> bool:
    """The method is valid but cannot run on this machine (e.g. bitsandbytes
    without its CPU kernel): a fact about the machine, not a failure."""
    return row.get("error_type") == "MethodUnavailableError"


def float_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["label"] == "float32" and "error" not in r), None)


def conditions(rows: list[dict[str, Any]]) -> str:
    """One sentence stating what every figure in the table was measured on."""
    done = [r for r in rows if "error" not in r]
    if not done:
        return "No variant could be measured."
    first = done[0]
    decode = first["decode"]
    text = LABELS[first.get("text", WIKITEXT)]
    return (
        f"{text}: first {first['tokens']} tokens in {first['windows']} non-overlapping "
        f"windows of {first['window']} ({first['predictions']} predictions). Decode: greedy, "
        f"batch 1, {decode['prompt_tokens']}-token prompt, {decode['new_tokens']} new tokens, "
        f"best of {decode['repeats']}, {decode['threads']} torch "
        f"thread{'' if decode['threads'] == 1 else 's'}. decode ×float is "
        "against float32 timed in turns with the variant in the same process. KL is "
        "KL(float32 ‖ variant) per predicted token; peak RSS is the serving peak "
        "(decode plus one window) of a process holding only that variant."
    )


def render_table(rows: list[dict[str, Any]]) -> str:
    base = float_row(rows)
    lines = [HEADER, ALIGN, *(_row(row, base) for row in rows)]
    return "\n".join(lines)

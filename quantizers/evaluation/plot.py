"""Perplexity against weight bytes: the trade-off at a glance.

Every measured variant is a labelled point; lower and further left is better,
so a method that sits below the line between two others buys quality more
cheaply than mixing them would. Bytes are on a log axis because the float32
baseline is several times larger than the quantised cluster, and labels are
nudged apart (with a leader line) so that methods with nearly equal bytes
stay readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantizers.evaluation.table import MIB

# Label positions tried in turn (points from the marker), until one overlaps
# no label placed before it.
_OFFSETS = [(6, 4), (6, -12), (-6, 4), (-6, -12), (6, 16), (6, -24), (-6, 16), (-6, -24),
            (6, 28), (6, -36)]
_CHAR_POINTS = 4.6  # width of one character at font size 8, in points
_LINE_POINTS = 10.0


def _boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]
                   ) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label_box(x: float, y: float, text: str, offset: tuple[int, int], scale: float
               ) -> tuple[float, float, float, float]:
    """The label's rectangle in display pixels (`scale` pixels per point)."""
    width = len(text) * _CHAR_POINTS * scale
    left = x + offset[0] * scale - (width if offset[0] < 0 else 0)
    bottom = y + offset[1] * scale
    return left, bottom, left + width, bottom + _LINE_POINTS * scale


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    done = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    xs = [r["weight_bytes"] / MIB for r in done]
    ys = [r["perplexity"] for r in done]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("weight bytes (MiB, log scale)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    scale = fig.dpi / 72
    placed: list[tuple[float, float, float, float]] = []
    for row, x, y in sorted(zip(done, xs, ys, strict=True), key=lambda item: item[2]):
        px, py = ax.transData.transform((x, y))
        boxes = [(offset, _label_box(px, py, row["label"], offset, scale)) for offset in _OFFSETS]
        offset, box = next(
            ((o, b) for o, b in boxes if not any(_boxes_overlap(b, p) for p in placed)), boxes[0]
        )
        placed.append(box)
        leader = None if offset == _OFFSETS[0] else {"arrowstyle": "-", "lw": 0.5,
                                                       "color": "gray"}
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=offset,
                    ha="right" if offset[0] < 0 else "left", fontsize=8, arrowprops=leader)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

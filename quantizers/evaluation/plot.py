"""Perplexity against weight bytes: the trade-off at a glance.

Every measured variant is a labelled point; lower and further left is better,
so a method that sits below the line between two others buys quality more
cheaply than mixing them would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantizers.evaluation.table import MIB


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    xs = [r["weight_bytes"] / MIB for r in done]
    ys = [r["perplexity"] for r in done]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for row, x, y in zip(done, xs, ys, strict=True):
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("weight bytes (MiB)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

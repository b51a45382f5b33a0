"""Plot the loss curves of the `qat` rows of a `quantserve eval --output-json` file.

Also reads `bench/qat_heldout.py --output-json` files (the same shape).
Left: the block-wise phase, each block's loss divided by its first step's (so
blocks of different scale share an axis), every block faint and their mean in
bold. Right: the end-to-end phase's KL from the float model per step.

    python bench/qat_loss_plot.py docs/benchmarks-qat.json docs/benchmarks-qat-loss.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_json", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    rows = [
        row
        for row in json.loads(args.eval_json.read_text())["rows"]
        if row.get("method") == "qat" and row.get("quant_report")
    ]
    if not rows:
        raise SystemExit("no qat row with a report in that file")
    fig, (blocks_ax, e2e_ax) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for index, row in enumerate(rows):
        qat = row["quant_report"]["extra"]["qat"]
        color = f"C{index}"
        curves = [
            [loss / curve[0] for loss in curve]
            for curve in qat["block_losses"]
            if curve and curve[0] > 0
        ]
        for curve in curves:
            blocks_ax.plot(curve, color=color, alpha=0.12, linewidth=0.8)
        if curves:
            steps = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(steps)]
            blocks_ax.plot(mean, color=color, linewidth=2, label=row["label"])
        if qat["e2e_losses"]:
            e2e_ax.plot(qat["e2e_losses"], color=color, label=row["label"])
    blocks_ax.set_title(
        "block-wise: relative squared error / first step's (each block; mean bold)", fontsize=9
    )
    blocks_ax.set_xlabel("step within the block")
    blocks_ax.set_ylim(bottom=0)
    e2e_ax.set_title("end-to-end: KL(float || quantised) per token", fontsize=9)
    e2e_ax.set_xlabel("step")
    for ax in (blocks_ax, e2e_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(args.output)


if __name__ == "__main__":
    main()

"""QAT settings on SmolLM2-135M, judged on held-out calibration text (never WikiText).

Each `--config` is one `qat` config; it trains on the tinyshakespeare
calibration text (the eval's and the server's default: 64 x 256 tokens) and is
scored on Alice in Wonderland, a text it never saw: perplexity and KL from the
float model over `--heldout-tokens` tokens in windows of 256. Each config runs
in turn in this one process on a fresh float copy; the float model and RTN
(the qat start with no training) are scored in the same run, so the figures
are ratios against a baseline measured next to them. Prints the machine (CPU
model, kernel flags, cores, torch threads), then per config wall and CPU seconds,
the RSS peak above the loaded float model, and the loss curve's ends.

    python bench/qat_heldout.py --threads 1 --config '{}' --config '{"schedule": "block"}'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from quantizers.calibration import CalibrationConfig, calibration_batches
from quantizers.evaluation.divergence import compare
from quantizers.evaluation.machine import describe_machine
from quantizers.evaluation.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from quantizers.evaluation.wikitext import wikitext_tokens
from quantizers.loading import load_model
from quantizers.registry import quantize

MIB = 1024 * 1024


def _show(done: int, total: int, detail: dict | None = None) -> None:
    if detail is not None and detail["step"] % 32 == 0:
        print(f"  {detail}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], metavar="JSON")
    parser.add_argument(
        "--base",
        default="{}",
        metavar="JSON",
        help="settings merged into every config, the RTN row's too "
        "(e.g. a skip list that trains only the first blocks)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heldout-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument(
        "--output-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write every row with its quantisation report (loss curves "
        "included), in the shape bench/qat_loss_plot.py reads",
    )
    parser.add_argument(
        "--wikitext-tokens",
        type=int,
        default=0,
        metavar="N",
        help="also report WikiText-2 test perplexity over its first N tokens "
        "in windows of 512, as `quantserve eval` does (a reported figure, "
        "never a tuning signal)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {describe_machine(args.threads)}; load {os.getloadavg()[0]:.1f}", flush=True)

    loaded = load_model(dtype="float32")
    batches = calibration_batches(loaded.tokenizer, CalibrationConfig())
    alice = CalibrationConfig(dataset="alice").path().read_text(encoding="utf-8")
    heldout = torch.tensor(loaded.tokenizer(alice, add_special_tokens=False)["input_ids"])
    heldout = heldout[: args.heldout_tokens]
    wikitext = (
        wikitext_tokens(loaded.tokenizer, args.wikitext_tokens) if args.wikitext_tokens else None
    )
    base = loaded.model
    shared = json.loads(args.base)
    configs = [
        {**shared, **json.loads(c)}
        for c in ['{"schedule": "block", "block_steps": 0}', *args.config]
    ]
    rows = []
    for config in configs:
        model = copy.deepcopy(base)
        float_rss = current_rss_bytes() or 0
        reset_peak_rss()
        started, cpu_started = time.perf_counter(), time.process_time()
        report = quantize(model, "qat", config, calibration=batches, progress=_show)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        peak = (peak_rss_bytes() or 0) - float_rss
        result = compare(base, model, heldout, args.window)
        wiki = compare(base, model, wikitext, 512) if wikitext is not None else None
        qat = report.extra["qat"]
        blocks = [c for c in qat["block_losses"] if c]
        row = {
            "config": config,
            "heldout_ppl": round(result.perplexity, 3),
            "float_ppl": round(result.base_perplexity, 3),
            "kl": round(result.kl, 4),
            "top1": round(result.top1, 3),
            "wikitext_ppl": None if wiki is None else round(wiki.perplexity, 3),
            "wikitext_float_ppl": None if wiki is None else round(wiki.base_perplexity, 3),
            "wikitext_kl": None if wiki is None else round(wiki.kl, 4),
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "peak_over_float_mib": round(peak / MIB),
            "load": round(os.getloadavg()[0], 1),
            "block0_loss": [blocks[0][0], blocks[0][-1]] if blocks else None,
            "last_block_loss": [blocks[-1][0], blocks[-1][-1]] if blocks else None,
            "e2e_loss": [qat["e2e_losses"][0], qat["e2e_losses"][-1]]
            if qat["e2e_losses"]
            else None,
        }
        print(json.dumps(row), flush=True)
        summary = {key: value for key, value in report.to_dict().items() if key != "layers"}
        rows.append(
            {**row, "label": f"qat {json.dumps(config)}", "method": "qat", "quant_report": summary}
        )
        del model
    if args.output_json is not None:
        args.output_json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()

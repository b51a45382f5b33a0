"""`quantserve eval`: measure quality, size and speed of quantisation methods.

Each variant (float32 and bf16 baselines, then every `--method`) is measured in
its own worker process against a float snapshot written once, and the results
become one markdown table with ratios against float32, optionally a JSON file,
a section of a markdown document and a PNG plot of perplexity against bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from quantizers import list_methods
from quantizers.evaluation.machine import describe_machine
from quantizers.evaluation.markdown import replace_section
from quantizers.evaluation.plot import write_plot
from quantizers.evaluation.snapshot import write_snapshot
from quantizers.evaluation.table import conditions, is_unavailable, render_table
from quantizers.evaluation.targets import check_targets, render_verdicts
from quantizers.evaluation.texts import TEXTS, VALIDATION, VALIDATION_DATASET, WIKITEXT
from quantizers.evaluation.variants import (
    Variant,
    VariantSpecError,
    parse_config,
    parse_variants,
)
from quantizers.evaluation.worker import WorkerSpec
from quantizers.loading import ModelLoadError, load_model

SECTION_TITLE = "Quality and size by method"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", action="append", default=[], metavar="M",
        help="method to measure; repeat or give a comma list; 'NAME:JSON' gives one method "
        "its own config (e.g. 'int4:{\"group_size\": 64}'); float32 and bf16 are always measured",
    )
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="config for every method given without its own ':JSON'")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="local GGUF file or HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--limit-tokens", type=int, default=4096, metavar="N",
                        help="score only the first N tokens of the text (0: the whole text)")
    parser.add_argument("--text", choices=TEXTS, default=WIKITEXT,
                        help="wikitext: the WikiText-2 test split, for reported figures; "
                        "validation: held-out text on which defaults are chosen")
    parser.add_argument("--window", type=int, default=512, metavar="N",
                        help="length of the non-overlapping perplexity windows")
    parser.add_argument("--calibration-dataset", default="tinyshakespeare",
                        help="tinyshakespeare, alice or a text file path")
    parser.add_argument("--calibration-samples", type=int, default=64, metavar="N")
    parser.add_argument("--calibration-seq-len", type=int, default=256, metavar="N")
    parser.add_argument("--decode-tokens", type=int, default=32, metavar="N",
                        help="tokens generated per decode-speed run")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads in each worker (default: torch's choice)")
    parser.add_argument("--output-md", type=Path, default=None, metavar="PATH",
                        help="write the table as one '## ' section of this markdown file, "
                        "keeping its other sections")
    parser.add_argument("--section", default=SECTION_TITLE, metavar="TITLE",
                        help=f"title of that section (default: '{SECTION_TITLE}')")
    parser.add_argument("--output-json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="PNG of perplexity against weight bytes")


def _unknown_methods(variants: list[Variant]) -> list[str]:
    """Method names the registry does not know, caught before the slow model load."""
    known = set(list_methods())
    return [v.method for v in variants if not v.is_baseline and v.method not in known]


def _measure(spec: WorkerSpec, workdir: Path, index: int) -> dict[str, Any]:
    spec_path = workdir / f"spec-{index}.json"
    result_path = workdir / f"result-{index}.json"
    spec_path.write_text(spec.to_json())
    command = [sys.executable, "-m", "quantizers.evaluation.worker", str(spec_path),
               str(result_path)]
    completed = subprocess.run(command, check=False)
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"method": spec.method, "config": spec.config,
            "error": f"worker exited with status {completed.returncode} and no result"}


def _document(rows: list[dict[str, Any]], args: argparse.Namespace, command: str,
              model_name: str) -> str:
    lines = [
        f"Model: {model_name}. Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
        f"on {describe_machine(args.threads)}.",
        "",
        f"Command: `{command}`",
        "",
        conditions(rows),
        "",
        render_table(rows),
    ]
    if args.text == WIKITEXT:  # the targets are stated on WikiText-2 test
        lines += [
            "",
            "Targets of the quantizers and smarter-quantisation issues, judged on this run "
            "(ratios against float32; decode against float32 in the same process):",
            "",
            render_verdicts(check_targets(rows)),
        ]
    if args.plot is not None and args.output_md is not None:
        relative = os.path.relpath(args.plot, args.output_md.parent)
        lines += ["", f"![perplexity against weight bytes]({relative})"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Measure every variant; 0 when all ran (or could not run on this machine),
    1 when one failed, 2 on bad input."""
    try:
        variants = parse_variants(args.method, parse_config(args.config))
    except VariantSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = _unknown_methods(variants)
    if unknown:
        print(f"error: unknown method(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.text == VALIDATION and args.calibration_dataset == VALIDATION_DATASET:
        print("error: the validation text cannot also be the calibration text", file=sys.stderr)
        return 2
    if args.window < 2 or args.limit_tokens < 0:
        print("error: --window must be >= 2 and --limit-tokens >= 0", file=sys.stderr)
        return 2
    command = getattr(args, "command_line", None) or shlex.join(["quantserve", *sys.argv[1:]])
    try:
        lm = load_model(args.model, dtype=torch.float32)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    calibration = {"dataset": args.calibration_dataset, "samples": args.calibration_samples,
                   "seq_len": args.calibration_seq_len}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantserve-eval-") as tmp:
        workdir = Path(tmp)
        snapshot = write_snapshot(lm.model, lm.tokenizer, workdir / "float")
        model_name = lm.model_id
        del lm
        for index, variant in enumerate(variants):
            print(f"[eval] {index + 1}/{len(variants)} {variant.label}", file=sys.stderr)
            spec = WorkerSpec(
                snapshot=str(snapshot), method=variant.method, config=variant.config,
                limit_tokens=args.limit_tokens or None, window=args.window,
                calibration=calibration, decode_tokens=args.decode_tokens, threads=args.threads,
                text=args.text,
            )
            rows.append({"label": variant.label, **_measure(spec, workdir, index)})
    body = _document(rows, args, command, model_name)
    print(body)
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    if args.plot is not None:
        write_plot(rows, args.plot, f"{model_name}: {conditions(rows).split('.')[0]}")
    if args.output_md is not None:
        replace_section(args.output_md, args.section, body)
    return 1 if any("error" in row and not is_unavailable(row) for row in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantizers.evaluation.cli",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(
        [".venv/bin/python", "-m", "quantizers.evaluation.cli",
         *(sys.argv[1:] if argv is None else argv)]
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

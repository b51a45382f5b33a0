"""Our GGUF exports of the embedded SmolLM2, scored by llama.cpp's own `llama-perplexity`.

Targets (issue #20): our int4 g32 export within 0.5% of llama.cpp's perplexity
on the original Q4_1 file (the base we dequantised it from), and our GPTQ int4
export better than our RTN int4 export at the same group size: our methods,
inside llama.cpp. Every file is scored by the same binary on the same
WikiText-2 test text (quantizers' evaluation data), the same chunks and
context, so the ratios compare the weights only. Variants are taken from the
artifact cache (built there when missing, exactly as `quantserve export` does).

llama.cpp's CPU weight repacking (AMX/REPACK paths of the llama-cpp-python
0.3.16 vendored build) gave perplexity ~400 for the original Q4_1 file on this
machine (Sapphire Rapids, AMX): `--no-repack` is passed to every run.

    bash scripts/build_llama_cpp.sh        # prints the folder of the binaries
    .venv/bin/python bench/export_perplexity.py --llama-perplexity BIN/llama-perplexity \
        --chunks 40
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from quantizers.artifacts import ArtifactStore
from quantizers.calibration import CalibrationConfig
from quantizers.evaluation.machine import describe_machine
from quantizers.evaluation.wikitext import wikitext_path
from quantizers.export import export_artifact
from quantizers.loading import embedded_model_path
from server.settings import Settings
from server.variant_pipeline import BaseModelRef, BuildHooks, build_variant, resolve_spec

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(binary: Path, model: Path, text: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [str(binary), "-m", str(model), "-f", str(text), "-c", str(args.ctx),
               "--chunks", str(args.chunks), "-t", str(args.threads), "--no-repack"]
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    match = _FINAL.search(out)
    if match is None:
        raise RuntimeError(f"no perplexity in the output of {' '.join(command)}:\n{out[-2000:]}")
    return {"ppl": float(match.group(1)), "error": float(match.group(2)),
            "seconds": round(time.perf_counter() - started, 1)}


def variant(store: ArtifactStore, base: BaseModelRef, method: str, config: dict[str, Any],
            calibration: CalibrationConfig | None) -> Any:
    spec = resolve_spec(base, method, config, calibration)
    cached = store.get(spec.key)
    if cached is not None:
        return cached
    print(f"building {method} {config} ...", flush=True)
    return build_variant(spec, base, store, BuildHooks(), quality_tokens=0)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-perplexity", type=Path, required=True)
    parser.add_argument("--chunks", type=int, default=40, help="chunks of --ctx tokens scored")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gptq-group-size", type=int, default=128,
                        help="group size of the GPTQ-against-RTN comparison (at g32 RTN "
                             "reproduces the original Q4_1 grid, so there is nothing to win)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="artifact cache (default: QUANTSERVE_CACHE_DIR or the user cache)")
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()

    print(f"machine: {describe_machine()}; llama.cpp threads {args.threads}", flush=True)
    settings = Settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    store = ArtifactStore(settings.cache_dir, settings.cache_max_bytes)
    base = BaseModelRef.resolve(None, None, "cpu")
    gptq_group = {"group_size": args.gptq_group_size}
    calibration = CalibrationConfig(samples=args.calibration_samples, seq_len=256)
    g = args.gptq_group_size
    variants = {
        "int4 g32 (RTN)": ("int4", {"group_size": 32}, None),
        f"int4 g{g} (RTN)": ("int4", gptq_group, None),
        f"gptq int4 g{g}": ("gptq", gptq_group, calibration),
    }
    text = wikitext_path()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="export-ppl-") as directory:
        files = {"original Q4_1 (llama.cpp)": embedded_model_path()}
        for label, (method, config, calib) in variants.items():
            artifact = variant(store, base, method, config, calib)
            path = Path(directory) / f"{artifact.key[:12]}.gguf"
            report = export_artifact(artifact, "gguf", path)
            print(f"exported {label}: {report['bytes']} bytes, max |GGUF - ours| "
                  f"{report['max_abs_error']:.3g}", flush=True)
            files[label] = path
        for label, path in files.items():
            results[label] = perplexity(args.llama_perplexity, path, text, args)
            print(f"{label}: {results[label]}", flush=True)
    original = results["original Q4_1 (llama.cpp)"]["ppl"]
    rtn32, rtn, gptq = (results[label]["ppl"] for label in variants)
    within = abs(rtn32 / original - 1)
    print(f"\nllama-perplexity, WikiText-2 test, {args.chunks} chunks of {args.ctx} tokens")
    print("| file | perplexity | ± | × original |")
    print("|---|---:|---:|---:|")
    for label, result in results.items():
        print(f"| {label} | {result['ppl']:.4f} | {result['error']:.4f} | "
              f"{result['ppl'] / original:.4f} |")
    print(f"\nint4 g32 export within 0.5% of the original: {within * 100:.2f}% -> "
          f"{'pass' if within <= 0.005 else 'FAIL'}")
    print(f"gptq g{g} export better than RTN g{g} export: {gptq:.4f} vs {rtn:.4f} -> "
          f"{'pass' if gptq < rtn else 'FAIL'}")
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

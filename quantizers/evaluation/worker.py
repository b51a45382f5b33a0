"""Measure one model variant, alone in its own process.

`python -m quantizers.evaluation.worker SPEC.json RESULT.json` loads the float
snapshot, builds the variant (float32, a bf16 cast, or `quantizers.quantize`
with a method), and records, in this order:

1. quantisation time and the RSS peak above the loaded float model while
   quantising (the library promises about one float layer plus the result).
   The calibration text is tokenised before that window, as the server does
   in its own "calibrate" step: its time and the tokenizer's memory are data
   preparation, not quantisation (tokenising the default text peaks ~200 MiB
   and takes seconds on a loaded machine, which used to land in the figures
   of int8, a method that reads no calibration at all); it is reported apart;
2. the serving peak RSS (a greedy decode plus one evaluation window's
   forward), measured before anything else is loaded;
3. perplexity, KL and top-1 against the float model, which is loaded again
   only now so it cannot inflate the peak of step 2;
4. decode tokens/s at batch 1, timed in turns with that float model, so the
   speed ratio holds even when neighbours load the machine;
5. weight bytes and bits per weight.

A QuantizationError is recorded as the variant's error instead of a crash, so
one method that cannot run here does not sink the whole table.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from quantizers.evaluation.divergence import compare
from quantizers.evaluation.memory import (
    current_rss_bytes,
    peak_rss_bytes,
    release_free_memory,
    reset_peak_rss,
)
from quantizers.evaluation.perplexity import split_windows, window_logits
from quantizers.evaluation.size import linear_weight_counts, size_report
from quantizers.evaluation.speed import decode_speeds, greedy_decode
from quantizers.evaluation.texts import WIKITEXT, evaluation_tokens
from quantizers.evaluation.variants import BF16, FLOAT32
from quantizers.loading import load_model


@dataclass
class WorkerSpec:
    """Everything a worker needs, passed as JSON so the process starts clean."""

    snapshot: str
    method: str
    config: dict[str, Any] | None
    limit_tokens: int | None
    window: int
    calibration: dict[str, Any]
    decode_tokens: int = 32
    decode_prompt_tokens: int = 32
    decode_repeats: int = 3
    threads: int | None = None
    text: str = WIKITEXT

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _difference(high: int | None, low: int | None) -> int | None:
    return None if high is None or low is None else high - low


def _calibration(lm: Any, spec: WorkerSpec) -> list[torch.Tensor] | None:
    """The calibration batches a quantisation method gets (none for baselines)."""
    if spec.method in (FLOAT32, BF16):
        return None
    from quantizers.calibration import CalibrationConfig, calibration_batches

    return calibration_batches(lm.tokenizer, CalibrationConfig(**spec.calibration))


def _quantize(
    lm: Any, spec: WorkerSpec, batches: list[torch.Tensor] | None
) -> dict[str, Any] | None:
    """Turn the loaded float model into the variant; returns the QuantReport dict."""
    if spec.method == FLOAT32:
        return None
    if spec.method == BF16:
        lm.model.to(torch.bfloat16)
        return None
    from quantizers import quantize

    return quantize(lm.model, spec.method, spec.config, calibration=batches).to_dict()


def _log(phase: str, since: float) -> float:
    now = time.perf_counter()
    print(f"[eval worker] {phase}: {now - since:.1f} s", file=sys.stderr, flush=True)
    return now


def _load_resident(snapshot: str) -> Any:
    """Load the float snapshot with every tensor in private memory.

    safetensors loads may leave tensors backed by the memory-mapped file, whose
    pages only become resident when first touched; the quantised variant would
    then seem to cost more than the float model it came from. A copy gives the
    same resident footprint as loading from the GGUF, where tensors are
    dequantised into fresh memory.
    """
    lm = load_model(snapshot, dtype=torch.float32)
    with torch.no_grad():
        for tensor in [*lm.model.parameters(), *lm.model.buffers()]:
            tensor.data = tensor.data.clone()
    return lm


def measure(spec: WorkerSpec) -> dict[str, Any]:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    clock = time.perf_counter()
    lm = _load_resident(spec.snapshot)
    linear_counts = linear_weight_counts(lm.model)
    params = lm.param_count
    ids = evaluation_tokens(lm.tokenizer, spec.text, spec.limit_tokens)
    first_window = split_windows(ids, spec.window)[0]
    prompt = ids[: spec.decode_prompt_tokens].unsqueeze(0)
    clock = _log("load", clock)
    batches = _calibration(lm, spec)
    calibration_seconds = time.perf_counter() - clock
    clock = _log("calibration text", clock)

    release_free_memory()
    float_rss = current_rss_bytes()
    peak_supported = reset_peak_rss()
    start = time.perf_counter()
    report = _quantize(lm, spec, batches)
    quant_seconds = time.perf_counter() - start
    del batches
    quant_peak = peak_rss_bytes() if peak_supported else None
    clock = _log("quantise", clock)

    release_free_memory()
    reset_peak_rss()
    greedy_decode(lm.model, prompt, spec.decode_tokens)
    window_logits(lm.model, first_window)
    serving_peak = peak_rss_bytes() if peak_supported else None
    clock = _log("serving peak", clock)

    base = lm if spec.method == FLOAT32 else _load_resident(spec.snapshot)
    quality = compare(base.model, lm.model, ids, spec.window)
    clock = _log("quality", clock)
    pair = [lm.model] if base is lm else [lm.model, base.model]
    speeds = decode_speeds(pair, prompt, spec.decode_tokens, spec.decode_repeats)
    _log("decode speed", clock)
    size = size_report(lm.model, linear_counts, params)
    return {
        "method": spec.method,
        "config": report["config"] if report else spec.config,
        "text": spec.text,
        **quality.to_dict(),
        **size.to_dict(),
        "quant_seconds": quant_seconds,
        "calibration_text_seconds": calibration_seconds,
        "decode": speeds[0].to_dict(),
        "float_decode_same_process": speeds[-1].to_dict(),
        "peak_rss_bytes": serving_peak,
        "float_rss_bytes": float_rss,
        "quant_peak_over_float_bytes": _difference(quant_peak, float_rss),
        "quant_report": _summary(report),
    }


def _summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The QuantReport without its per-layer table, which would swamp the JSON."""
    if report is None:
        return None
    return {key: value for key, value in report.items() if key != "layers"}


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = WorkerSpec(**json.loads(spec_path.read_text()))
    from quantizers.errors import QuantizationError

    try:
        result = measure(spec)
        code = 0
    except QuantizationError as exc:
        result = {"method": spec.method, "config": spec.config, "error": exc.message,
                  "error_type": type(exc).__name__}
        code = 3
    except Exception as exc:
        traceback.print_exc()
        result = {"method": spec.method, "config": spec.config,
                  "error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__}
        code = 1
    result_path.write_text(json.dumps(result, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

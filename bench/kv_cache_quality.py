"""What the int8 KV cache costs in quality: perplexity and KL against the bf16 cache.

The served model (embedded SmolLM2-135M-Instruct, bf16, as `quantserve serve`
loads it) scores WikiText-2 test (or the validation text) in the windows and
with the token limit `quantserve eval` uses, once attending over bf16 keys and
values and once over keys and values rounded through int8 as the pool stores
them (`quantizers/evaluation/kv_cache.py`: every position sees its keys as a
decoded token would, the upper bound of the error). Reports both perplexities,
mean KL(bf16 cache || int8 cache) and top-1 agreement.

    .venv/bin/python bench/kv_cache_quality.py [--text wikitext] [--limit-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantizers.evaluation.divergence import compare  # noqa: E402
from quantizers.evaluation.kv_cache import Int8KVModel  # noqa: E402
from quantizers.evaluation.machine import describe_machine  # noqa: E402
from quantizers.evaluation.texts import LABELS, TEXTS, WIKITEXT, evaluation_tokens  # noqa: E402
from quantizers.loading import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--text", choices=TEXTS, default=WIKITEXT)
    parser.add_argument("--limit-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    print(describe_machine(len(os.sched_getaffinity(0))), flush=True)
    loaded = load_model(args.model, dtype=args.dtype)
    ids = evaluation_tokens(loaded.tokenizer, args.text, args.limit_tokens or None)
    started = time.perf_counter()
    result = compare(loaded.model, Int8KVModel(loaded.model), ids, args.window)
    report = {
        "model": loaded.model_id,
        "dtype": args.dtype,
        "text": LABELS[args.text],
        "base": f"{args.dtype} KV cache",
        "compared": "int8 KV cache",
        **result.to_dict(),
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

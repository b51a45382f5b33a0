"""Engine decode speed of this checkout against another git ref, alternating.

The ref's tree is exported with `git archive` into a temporary folder; one
process per checkout loads the embedded SmolLM2 in bf16 into its own engine,
warms it up, then both answer rounds in turn (alternating, so load from other
processes hits them alike): batch-1 decode tokens/s of one greedy request, and
total tokens/s of 8 concurrent requests. Report the ratios.

    .venv/bin/python bench/decode_vs_ref.py --ref main --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from quantizers.evaluation.machine import describe_machine  # noqa: E402

# Runs inside each checkout (its own `server` package): the engine's limits
# are passed under whichever names that version's Engine takes.
CHILD = r'''
import asyncio, inspect, json, random, sys, time
import torch
from quantizers.loading import load_model
from server.engine import Engine, Finish, GenerationRequest, SamplingParams

threads, prompt_len, tokens = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(threads)
names = inspect.signature(Engine).parameters
limits = ({"max_num_seqs": 8, "max_model_len": 1024} if "max_num_seqs" in names
          else {"max_batch": 8, "max_batch_tokens": 1024})
engine = Engine(load_model(dtype="bfloat16"), num_threads=threads, **limits)
engine.start()
rng = random.Random(0)
prompts = [[rng.randrange(1000, 40000) for _ in range(prompt_len)] for _ in range(8)]
params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

async def one(ids):
    async for item in engine.generate(GenerationRequest("bench", ids, params)):
        if isinstance(item, Finish):
            return item

async def many():
    return await asyncio.gather(*(one(p) for p in prompts))

print("ready", flush=True)
for line in sys.stdin:
    finish = asyncio.run(one(prompts[0]))
    single = (finish.completion_tokens - 1) / finish.timings.decode_s
    start = time.perf_counter()
    finishes = asyncio.run(many())
    batched = sum(f.completion_tokens for f in finishes) / (time.perf_counter() - start)
    print(json.dumps({"batch1_decode_tps": single, "batch8_total_tps": batched}), flush=True)
engine.shutdown()
'''


def export(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=REPO, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def start(checkout: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(args.threads), str(args.prompt_tokens),
         str(args.tokens)],
        cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert process.stdout is not None
    while (line := process.stdout.readline()) and line.strip() != "ready":
        pass
    if not line:
        raise RuntimeError(f"the engine in {checkout} did not start")
    return process


def measure(process: subprocess.Popen[str]) -> dict[str, float]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("run\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="main")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    print(describe_machine(args.threads), "(per engine)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkouts = {args.ref: export(args.ref, Path(tmp)), "this checkout": REPO}
        processes = {label: start(path, args) for label, path in checkouts.items()}
        rounds: dict[str, list[dict[str, float]]] = {label: [] for label in processes}
        try:
            for _ in range(args.reps):
                for label, process in processes.items():
                    rounds[label].append(measure(process))
        finally:
            for process in processes.values():
                process.communicate(timeout=120)
    table: dict[str, dict[str, Any]] = {
        label: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for label, rows in rounds.items()
    }
    print(f"prompt {args.prompt_tokens} tokens, {args.tokens} greedy tokens, bf16, "
          f"median of {args.reps} alternating rounds")
    for label, row in table.items():
        print(f"  {label:<16} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    for key in table["this checkout"]:
        print(f"ratio {key} (this / {args.ref}): "
              f"{table['this checkout'][key] / table[args.ref][key]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One decode step of the lean runner: the native step against the eager one.

For each variant of the embedded SmolLM2 (bf16, int8, int4 g128), two runners
over copies of the same weights, one decoding natively and one eagerly, take
turns (alternating, so the host's drift hits both alike) at a batch of
sequences all at the same position: milliseconds per step, median of rounds,
and the ratio. The engine's own speed, with scheduling and sampling, is
`serve_bench.py`'s.

    .venv/bin/python bench/decode_step.py --threads 2 --batch 1,16 --position 300
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_bench import in_fresh_thread as on_thread  # noqa: E402
from serve_bench import variant_model  # noqa: E402

from quantizers.evaluation.machine import describe_machine  # noqa: E402
from quantizers.loading import load_model  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.llama_runner import LlamaRunner  # noqa: E402

BLOCK = 16


def stepper(runner: LlamaRunner, batch: int, position: int) -> Callable[[], float]:
    """A function timing one decode step of `batch` sequences at `position`."""
    blocks = -(-(position + 1) // BLOCK)
    cache = KVCache(runner.kv_spec, blocks * batch, BLOCK)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    prompt = list(range(100, 100 + position))
    for table in tables:
        runner.prefill(cache, table, prompt)
    tokens = torch.full((batch,), 5)

    def step() -> float:
        start = time.perf_counter()
        runner.decode(cache, tokens, [position] * batch, tables)
        return time.perf_counter() - start

    return step


def runners(
    model: torch.nn.Module, name: str, args: argparse.Namespace
) -> tuple[LlamaRunner, LlamaRunner]:
    """A native and an eager runner over copies of `model`."""
    torch.set_num_threads(args.threads)
    native = LlamaRunner(copy.deepcopy(model), max_seq_len=args.position + 8)
    eager = LlamaRunner(model, max_seq_len=args.position + 8, native=False)
    if native.native is None:
        raise RuntimeError(f"{name}: no native step ({native.native_unsupported})")
    return native, eager


def measure(
    native: LlamaRunner, eager: LlamaRunner, batch: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Median seconds per step of the eager and the native runner, alternating."""
    torch.set_num_threads(args.threads)
    steps = [stepper(r, batch, args.position) for r in (eager, native)]
    times: list[list[float]] = [[], []]
    for _ in range(args.rounds):
        for index, step in enumerate(steps):
            step()  # the first step after the other runner's is not timed
            times[index].append(statistics.median(step() for _ in range(args.steps)))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="bf16,int8,int4")
    parser.add_argument("--batch", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--position", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(describe_machine(args.threads))
    # Every parallel torch op runs on a short-lived thread: an OpenMP pool left
    # on the main thread would shorten the measuring thread's spin-waits
    # (serve_bench.in_fresh_thread).
    base = on_thread(partial(load_model, dtype="float32"))
    print(f"{'variant':<8}{'batch':>6}{'eager ms':>10}{'native ms':>11}{'eager/native':>14}")
    for name in args.variants.split(","):
        model = on_thread(partial(variant_model, base, name)).model
        native, eager = on_thread(partial(runners, model, name, args))
        for batch in (int(b) for b in args.batch.split(",")):
            eager_s, native_s = on_thread(partial(measure, native, eager, batch, args))
            print(f"{name:<8}{batch:>6}{eager_s * 1e3:>10.2f}{native_s * 1e3:>11.2f}"
                  f"{eager_s / native_s:>14.2f}", flush=True)


if __name__ == "__main__":
    main()

"""What /metrics costs: scrape time, per-choice recording time, and decode
throughput with and without a scraper running.

The scraper calls the same `generate_latest` that `GET /metrics` serves, 10
times a second (150 times Prometheus' 15 s interval, a stress case), from its
own thread while the real engine decodes. Runs alternate without/with the
scraper so drift on a shared machine hits both alike; the figure is the ratio
of median tokens per second, measured in this one process.

    .venv/bin/python bench/metrics_overhead.py --tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from fastapi import FastAPI
from prometheus_client import REGISTRY, generate_latest

from quantizers.evaluation.machine import describe_machine
from quantizers.loading import load_model
from server.engine import Engine
from server.engine.types import Finish, GenerationRequest, SamplingParams, Timings
from server.metrics import record_generation
from server.observability import install_observability

SCRAPE_PERIOD_S = 0.1


def _finish(variant: str) -> Finish:
    gaps = (0.015,) * 19
    return Finish("stop", 10, 20, Timings(0.001, 0.02, 0.3, 0.03, 0.33, gaps), "bench", variant)


def recording_costs(repeats: int = 200) -> tuple[float, float, int]:
    """(seconds per scrape, seconds per record_generation, scrape bytes) with populated series."""
    for variant in ("float", "int8", "int4"):
        for endpoint in ("completions", "chat"):
            record_generation(endpoint, _finish(variant))
    started = time.perf_counter()
    for _ in range(repeats):
        record_generation("completions", _finish("float"))
    per_record = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        text = generate_latest(REGISTRY)
    return (time.perf_counter() - started) / repeats, per_record, len(text)


async def _decode(engine: Engine, tokens: int, prompt: list[int]) -> float:
    request = GenerationRequest(
        request_id=f"bench-{time.monotonic_ns()}", prompt_ids=prompt,
        params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    started = time.perf_counter()
    produced = 0
    async for event in engine.generate(request):
        if isinstance(event, Finish):
            produced = event.completion_tokens
    return produced / (time.perf_counter() - started)


def _scrape_until(stop: threading.Event, counter: list[int]) -> None:
    while not stop.wait(SCRAPE_PERIOD_S):
        generate_latest(REGISTRY)
        counter[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"Machine: {describe_machine(None)}", flush=True)

    loaded = load_model(dtype="bfloat16")
    app = FastAPI()
    install_observability(app)
    engine = Engine(loaded, max_num_seqs=1)
    engine.start()
    app.state.engine = engine
    prompt = loaded.tokenizer("The history of the printing press", add_special_tokens=False)[
        "input_ids"]
    scrape_s, record_s, scrape_bytes = recording_costs()
    without, with_scraper, scrapes = [], [], [0]
    try:
        for _ in range(args.rounds):
            without.append(asyncio.run(_decode(engine, args.tokens, prompt)))
            stop = threading.Event()
            scraper = threading.Thread(target=_scrape_until, args=(stop, scrapes))
            scraper.start()
            try:
                with_scraper.append(asyncio.run(_decode(engine, args.tokens, prompt)))
            finally:
                stop.set()
                scraper.join()
    finally:
        engine.shutdown(drain_timeout_s=5)
    base, loaded_rate = statistics.median(without), statistics.median(with_scraper)
    print(f"scrape: {scrape_s * 1e3:.2f} ms for {scrape_bytes} bytes; "
          f"record_generation (20-token choice): {record_s * 1e6:.0f} us")
    print(f"decode tokens/s without scraper {base:.1f}, with a 10 Hz scraper {loaded_rate:.1f} "
          f"({scrapes[0]} scrapes): ratio {loaded_rate / base:.3f}")


if __name__ == "__main__":
    main()

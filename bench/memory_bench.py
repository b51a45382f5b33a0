"""Memory of the serving process: idle RSS, RSS under long prompts, prefix-cache TTFT.

Three parts, each against real `quantserve serve` processes with default
settings (the embedded SmolLM2-135M, bf16, a fresh artifact cache):

* **idle**: RSS after start-up and one warm-up request, for the bf16 server and
  for `--quantize int4` (quantised at start-up, so the float model it was
  built from must be gone). Reports the RSS saved over the weight bytes saved.
* **long**: 16 concurrent clients, each a distinct ~1500-token prompt and 64
  new tokens, on the bf16 server: all must succeed; RSS growth (peak during the
  load minus idle) against the peak bytes of KV blocks holding tokens
  (`quantserve_kv_cache_bytes`, polled).
* **prefix**: pairs of requests sharing a 1500-token prefix (a new prefix per
  pair, suffixes differ): TTFT of the second over the first, the pairs
  measured one after another in the same server.

    .venv/bin/python bench/memory_bench.py --part all
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from load_test import rss_bytes, spawned_server  # noqa: E402

sys.path.insert(0, str(REPO))
from quantizers.evaluation.machine import describe_machine  # noqa: E402

MIB = 1 << 20
PROMPT_TOKENS = 1500
NEW_TOKENS = 64
CLIENTS = 16


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    return describe_machine(cores) + " (the servers' default: one thread per core)"


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def complete(base_url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed completion; TTFT is the time to the first content chunk."""
    model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0}
    started = time.perf_counter()
    ttft = None
    tokens = 0
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=900) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code, "body": response.read()[:200]}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - started
            tokens += 1 if chunk["choices"] and chunk["choices"][0].get("text") else 0
    return {"ok": True, "ttft_s": ttft, "e2e_s": time.perf_counter() - started, "chunks": tokens}


def random_prompt(rng: random.Random, length: int) -> list[int]:
    # Ordinary vocabulary ids (SmolLM2's specials are below 20).
    return [rng.randrange(1000, 40000) for _ in range(length)]


def settled_rss(pid: int) -> int:
    time.sleep(2.0)
    return rss_bytes(pid)


def idle(env: dict[str, str], workdir: Path) -> dict[str, Any]:
    workdir.mkdir()
    with spawned_server(env, workdir, ready_timeout_s=1200) as (url, pid):
        complete(url, [1000, 2000, 3000], 8)
        return {"rss": settled_rss(pid),
                "weights": metric(url, "quantserve_model_weight_bytes")}


def part_idle(workdir: Path) -> dict[str, Any]:
    bf16 = idle({}, workdir / "bf16")
    int4 = idle({"QUANTSERVE_QUANTIZE": "int4"}, workdir / "int4")
    saved_weights = bf16["weights"] - int4["weights"]
    saved_rss = bf16["rss"] - int4["rss"]
    return {"bf16_rss_mib": bf16["rss"] / MIB, "int4_rss_mib": int4["rss"] / MIB,
            "bf16_weight_mib": bf16["weights"] / MIB, "int4_weight_mib": int4["weights"] / MIB,
            "rss_saved_over_weights_saved": saved_rss / saved_weights}


def part_long(workdir: Path) -> dict[str, Any]:
    rng = random.Random(0)
    prompts = [random_prompt(rng, PROMPT_TOKENS) for _ in range(CLIENTS)]
    (workdir / "long").mkdir()
    with spawned_server({}, workdir / "long", ready_timeout_s=1200) as (url, pid):
        complete(url, [1000, 2000, 3000], 8)
        before = settled_rss(pid)
        peak = {"rss": before, "kv": 0.0, "used": 0.0}
        results: list[dict[str, Any]] = [{} for _ in prompts]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak["rss"] = max(peak["rss"], rss_bytes(pid))
                peak["kv"] = max(peak["kv"], metric(url, "quantserve_kv_cache_bytes"))
                peak["used"] = max(peak["used"], metric(url, "quantserve_kv_cache_blocks",
                                                        state="used"))
                time.sleep(0.2)

        def client(index: int) -> None:
            results[index] = complete(url, prompts[index], NEW_TOKENS)

        watcher = threading.Thread(target=poll)
        watcher.start()
        started = time.perf_counter()
        clients = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        elapsed = time.perf_counter() - started
        done.set()
        watcher.join()
        after = settled_rss(pid)
        return {
            "succeeded": sum(r.get("ok", False) for r in results), "clients": CLIENTS,
            "seconds": elapsed, "rss_idle_mib": before / MIB, "rss_peak_mib": peak["rss"] / MIB,
            "rss_after_mib": after / MIB, "kv_bytes_peak_mib": peak["kv"] / MIB,
            "kv_blocks_used_peak": peak["used"],
            "growth_over_kv": (peak["rss"] - before) / peak["kv"] if peak["kv"] else None,
            "preemptions": metric(url, "quantserve_preemptions_total"),
            "total_blocks": metric(url, "quantserve_kv_cache_blocks", state="total"),
        }


def part_prefix(workdir: Path, pairs: int) -> dict[str, Any]:
    rng = random.Random(1)
    firsts: list[float] = []
    seconds: list[float] = []
    (workdir / "prefix").mkdir()
    with spawned_server({}, workdir / "prefix", ready_timeout_s=1200) as (url, _):
        complete(url, [1000, 2000, 3000], 8)
        for _ in range(pairs):
            prefix = random_prompt(rng, PROMPT_TOKENS)
            first = complete(url, [*prefix, *random_prompt(rng, 20)], 1)
            second = complete(url, [*prefix, *random_prompt(rng, 20)], 1)
            firsts.append(first["ttft_s"])
            seconds.append(second["ttft_s"])
        hits = metric(url, "quantserve_prefix_cache_hits_total")
        queries = metric(url, "quantserve_prefix_cache_queries_total")
    return {"first_ttft_s": firsts, "second_ttft_s": seconds,
            "median_ratio": statistics.median(b / a for a, b in zip(firsts, seconds, strict=True)),
            "prefix_hit_rate": hits / queries if queries else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("idle", "long", "prefix", "all"), default="all")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    print(machine())
    report: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for part in ("idle", "long", "prefix"):
            if args.part not in (part, "all"):
                continue
            result = (part_idle(workdir) if part == "idle" else part_long(workdir)
                      if part == "long" else part_prefix(workdir, args.pairs))
            report[part] = result
            print(part, json.dumps(result, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generation speed: quantserve's engine against plain `generate` and llama.cpp.

Two parts, both alternating contenders inside one run so that load from other
processes hits them alike (report ratios, not absolute figures):

* `decode`: batch-1 prefill and decode tokens/s. quantserve's engine (fp32,
  bf16, int8, int4 g128) against transformers' `generate` (fp32, bf16) and
  llama.cpp's C++ `llama-server` on the embedded GGUF (Q4_1) and a Q8_0
  requantised from it (same prompt token ids, timings from its own response).
  Each row's achieved weight bandwidth (weight bytes read per token x decode
  tokens/s) is printed against the machine's measured read bandwidth.
* `hf-batching`: transformers' own continuous batching (`generate_batch`)
  against the engine on 8 concurrent prompts, the measurement behind writing
  our own scheduler.
* `served`: N concurrent official `openai` clients streaming completions from
  `quantserve serve --quantize int8|int4` and from llama.cpp's C++
  `llama-server -np 16 -cb` on the matching GGUF (Q8_0 / Q4_1): total generated
  tokens/s, TTFT and end-to-end latency percentiles. `--llama-cpp-python` adds
  `python -m llama_cpp.server` (one request at a time) as a second row.

    bash scripts/build_llama_cpp.sh          # llama.cpp's tools: ~15 min, once
    .venv/bin/python bench/serve_bench.py --part all --threads 2 \
        --llama-bin ~/.cache/quantserve/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantizers.datasets import data_file  # noqa: E402
from quantizers.evaluation.machine import describe_machine, memory_bandwidth  # noqa: E402
from quantizers.loading import LoadedModel, load_model  # noqa: E402
from server.engine import Engine, Finish, GenerationRequest, SamplingParams  # noqa: E402

TEXT = data_file(Path("calibration") / "carroll-alice.txt")


@dataclass
class Speed:
    prefill_tps: float
    decode_tps: float


def prompt_ids(tokenizer: Any, length: int, offset: int = 4000) -> list[int]:
    text = TEXT.read_text(encoding="utf-8")[offset : offset + 8 * length]
    return tokenizer.encode(text)[:length]


# ----------------------------------------------------------------- contenders
def engine_speed(engine: Engine, ids: list[int], tokens: int) -> Speed:
    """One greedy request through the engine; speeds from its own Timings."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one() -> Finish:
        async for item in engine.generate(GenerationRequest("bench", ids, params)):
            if isinstance(item, Finish):
                return item
        raise RuntimeError("no Finish")

    finish = asyncio.run(one())
    t = finish.timings
    return Speed(len(ids) / t.prefill_s, (finish.completion_tokens - 1) / t.decode_s)


def generate_speed(model: torch.nn.Module, ids: list[int], tokens: int) -> Speed:
    """Plain transformers `generate`, greedy; prefill measured as a 1-token call."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - start
    return Speed(len(ids) / prefill, (tokens - 1) / max(total - prefill, 1e-9))


def llama_speed(url: str, ids: list[int], tokens: int) -> Speed:
    """One greedy completion from `llama-server` on the same token ids, EOS
    ignored; prefill and decode speeds from the timings in its response."""
    body = json.dumps({"prompt": ids, "n_predict": tokens, "temperature": 0.0,
                       "ignore_eos": True, "cache_prompt": False}).encode()
    request = urllib.request.Request(f"{url}/completion", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        timings = json.load(response)["timings"]
    return Speed(timings["prompt_per_second"], timings["predicted_per_second"])


def gguf_for(quant: str, llama_bin: Path) -> Path:
    """The embedded Q4_1 GGUF, or a Q8_0 requantised from it with `llama-quantize`
    (cached between runs)."""
    from quantizers.loading import embedded_model_path

    gguf = embedded_model_path()
    if quant == "Q4_1":
        return gguf
    workdir = Path(tempfile.gettempdir()) / "quantserve-bench"
    workdir.mkdir(exist_ok=True)
    target = workdir / (gguf.stem.replace("Q4_1", quant) + ".gguf")
    if not target.is_file():
        subprocess.run([str(llama_bin / "llama-quantize"), "--allow-requantize", str(gguf),
                        str(target), quant], check=True, capture_output=True)
    return target


def start_llama_server(
    llama_bin: Path, gguf: Path, port: int, threads: int, slots: int
) -> subprocess.Popen[bytes]:
    """llama.cpp's own server: `slots` parallel sequences, continuous batching."""
    return subprocess.Popen(
        [str(llama_bin / "llama-server"), "-m", str(gguf), "--port", str(port),
         "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-cb",
         "-c", str(1024 * slots), "--alias", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step streams: every decoder layer's tensors and the head
    (the embedding reads one row per token)."""
    modules = [*model.model.layers, model.lm_head]
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def variant_model(base: LoadedModel, name: str) -> LoadedModel:
    """fp32 / bf16 copies of the float model, or an int8 / int4-g128 quantised one."""
    from quantizers import quantize

    model = copy.deepcopy(base.model)
    dtype = torch.float32 if name == "fp32" else torch.bfloat16
    model.to(dtype)
    quantization = None
    if name in ("int8", "int4"):
        config = {"group_size": 128} if name == "int4" else None
        report = quantize(model, name, config)
        quantization = report.to_dict()
        dtype = next(model.parameters()).dtype
    return LoadedModel(base.model_id, model, base.tokenizer, base.source, dtype, quantization)


def in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` on a thread that then exits.

    libgomp keeps one OpenMP pool per thread that ran a parallel region and,
    once more threads are pooled than there are cores, shortens every pool's
    spin-wait: a bf16 decode step on the engine's worker thread took 17.4 ms
    next to an idle pool on the main thread against 11.7 ms without it (same
    process, 2 threads). The server loads on a thread that exits, so the engine's
    worker is its only pool; a contender process is set up the same way.
    """
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("contender set-up failed (see the traceback above)")
    return box[0]


def build_contender(
    label: str, args: argparse.Namespace
) -> tuple[Callable[[], tuple[float, float]], dict]:
    """The measuring function of one decode contender (prefill and decode
    tokens/s, as a plain tuple for the pipe), and its start-up figures."""
    torch.set_num_threads(args.threads)
    kind, _, name = label.partition(" ")
    base = load_model(dtype="float32")
    ids = prompt_ids(base.tokenizer, args.prompt_tokens)
    measure: Callable[[], Speed]
    info: dict = {}
    if kind == "llama.cpp":
        gguf = gguf_for(name, args.llama_bin)
        port = free_port()
        server = start_llama_server(args.llama_bin, gguf, port, args.threads, 1)
        atexit.register(server.terminate)
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/health", server, 300)
        llama_speed(url, ids, 8)  # first request's one-off costs stay out of the table
        info = {"weight_bytes": gguf.stat().st_size}
        measure = partial(llama_speed, url, ids, args.tokens)
    elif kind == "generate":
        model = variant_model(base, name).model
        info = {"weight_bytes": decode_weight_bytes(model)}
        measure = partial(generate_speed, model, ids, args.tokens)
    else:
        loaded = variant_model(base, name)
        info = {"weight_bytes": decode_weight_bytes(loaded.model)}
        engine = Engine(loaded, max_num_seqs=1, max_model_len=1024,
                        num_threads=args.threads, compile=args.compile)
        engine.start()  # compilation and warm-up happen here, outside the timed runs
        extra = engine.stats().extra
        info |= {k: extra[k] for k in ("warmup_seconds", "compile_seconds", "decode_compiled",
                                       "decode_native")}
        measure = partial(engine_speed, engine, ids, args.tokens)

    def run() -> tuple[float, float]:
        speed = measure()
        return speed.prefill_tps, speed.decode_tps

    return run, info


Builder = Callable[[str, argparse.Namespace], tuple[Callable[[], Any], dict]]


def contender_process(conn: Any, build: Builder, label: str, args: argparse.Namespace) -> None:
    """Serve `run` requests for one contender until told to stop.

    Each contender has its own process, so the OpenMP pools of the others
    (idle while it runs) cannot slow it down; set-up runs on a thread that
    exits, and only the measurement runs on this process's main thread.
    """
    run, info = in_fresh_thread(lambda: build(label, args))
    conn.send(info)
    while conn.recv() == "run":
        conn.send(run())


def alternate(
    build: Builder, labels: list[str], args: argparse.Namespace
) -> tuple[dict[str, list[Any]], dict[str, dict]]:
    """`args.reps` alternating rounds over the contenders, each in its own
    process built by `build(label, args)`; their results and set-up infos."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    pipes: dict[str, Any] = {}
    processes = []
    infos: dict[str, dict] = {}
    try:
        for label in labels:  # set up one at a time: each loads the model
            parent, child = context.Pipe()
            process = context.Process(target=contender_process,
                                      args=(child, build, label, args))
            process.start()
            processes.append(process)
            pipes[label] = parent
            infos[label] = parent.recv()
        results: dict[str, list[Any]] = {label: [] for label in labels}
        for _ in range(args.reps):
            for label, pipe in pipes.items():
                pipe.send("run")
                results[label].append(pipe.recv())
    finally:
        for pipe in pipes.values():
            pipe.send("stop")
        for process in processes:
            process.join(60)
    return results, infos


def decode_part(args: argparse.Namespace) -> dict[str, Any]:
    labels = [f"generate {n}" for n in args.variants.split(",") if n in ("fp32", "bf16")]
    labels += [f"quantserve {n}" for n in args.variants.split(",")]
    if args.llama:
        labels += ["llama.cpp Q4_1", "llama.cpp Q8_0"]
    bandwidth = memory_bandwidth(args.threads)
    raw, infos = alternate(build_contender, labels, args)
    results = {label: [Speed(*row) for row in rows] for label, rows in raw.items()}
    warmups = {label.split(" ", 1)[1]: info for label, info in infos.items()
               if "warmup_seconds" in info}
    table = {
        name: {
            "prefill_tps": statistics.median(s.prefill_tps for s in speeds),
            "decode_tps": statistics.median(s.decode_tps for s in speeds),
        }
        for name, speeds in results.items()
    }
    print(f"\nstart-up of quantserve's engines (--compile {args.compile}), not timed below:")
    for name, info in warmups.items():
        print(f"  {name}: warm-up {info['warmup_seconds']:.1f} s, of which compiling "
              f"{info['compile_seconds']:.1f} s (decode {decode_mode(info)})")
    print(f"\nbatch-1, prompt {args.prompt_tokens} tokens, {args.tokens} greedy tokens, "
          f"{args.threads} threads, median of {args.reps} (alternating)")
    print(f"measured read bandwidth at {args.threads} threads: {bandwidth:.1f} GB/s "
          "(weight GB/s = weight bytes read per token x decode tok/s)")
    print(f"{'contender':<22}{'prefill tok/s':>15}{'decode tok/s':>15}{'weight MB':>11}"
          f"{'weight GB/s':>13}{'of measured':>13}")
    for name, row in table.items():
        weight = infos[name]["weight_bytes"]
        row["weight_bytes"] = weight
        row["weight_gbps"] = weight * row["decode_tps"] / 1e9
        print(f"{name:<22}{row['prefill_tps']:>15.1f}{row['decode_tps']:>15.1f}"
              f"{weight / 1e6:>11.1f}{row['weight_gbps']:>13.2f}"
              f"{row['weight_gbps'] / bandwidth:>12.0%}")
    ratios = decode_ratios(table)
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    return {"table": table, "ratios": ratios, "warmup": warmups, "memory_gbps": bandwidth}


def decode_mode(info: dict) -> str:
    """How an engine contender's decode steps ran, from its stats."""
    if info["decode_compiled"]:
        return "compiled"
    return "native" if info["decode_native"] else "eager"


def decode_ratios(table: dict[str, dict[str, float]]) -> dict[str, float]:
    pairs = {
        "bf16 decode vs generate bf16 (target >= 3)": ("quantserve bf16", "generate bf16"),
        "fp32 decode vs generate fp32": ("quantserve fp32", "generate fp32"),
        "int8 decode vs llama.cpp Q8_0 (target >= 1)": ("quantserve int8", "llama.cpp Q8_0"),
        "int4 decode vs llama.cpp Q4_1 (target >= 1)": ("quantserve int4", "llama.cpp Q4_1"),
    }
    ratios = {
        name: table[a]["decode_tps"] / table[b]["decode_tps"]
        for name, (a, b) in pairs.items() if a in table and b in table
    }
    for ours in ("int8", "int4", "bf16"):
        for theirs in ("Q4_1", "Q8_0"):
            a, b = f"quantserve {ours}", f"llama.cpp {theirs}"
            if a in table and b in table:
                ratios[f"{ours} prefill vs llama.cpp {theirs} (target >= 1)"] = (
                    table[a]["prefill_tps"] / table[b]["prefill_tps"]
                )
    return ratios


# ------------------------------------------------------- transformers batching
def engine_batch_tps(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    """Total generated tokens/s of concurrent greedy requests through the engine."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(ids: list[int]) -> int:
        async for item in engine.generate(GenerationRequest("bench", ids, params)):
            if isinstance(item, Finish):
                return item.completion_tokens
        return 0

    async def everything() -> list[int]:
        return await asyncio.gather(*(one(p) for p in prompts))

    start = time.perf_counter()
    produced = sum(asyncio.run(everything()))
    return produced / (time.perf_counter() - start)


def generate_batch_tps(model: Any, prompts: list[list[int]], tokens: int) -> float:
    """transformers' own continuous batching (`generate_batch`, paged cache)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=None)
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=config, max_new_tokens=tokens)
    produced = sum(len(o.generated_tokens) for o in outputs.values())
    return produced / (time.perf_counter() - start)


def build_batching_contender(
    label: str, args: argparse.Namespace
) -> tuple[Callable[[], float], dict]:
    """`generate_batch` or the engine on its own bf16 model (the engine installs
    its prepared modules in the model it serves, so the two must not share one)."""
    torch.set_num_threads(args.threads)
    loaded = load_model(dtype="bfloat16")
    prompts = [prompt_ids(loaded.tokenizer, 60, offset=3000 + 700 * i) for i in range(8)]
    if label == "generate_batch":
        return partial(generate_batch_tps, loaded.model, prompts, args.served_tokens), {}
    engine = Engine(loaded, max_num_seqs=8, max_model_len=1024, num_threads=args.threads)
    engine.start()
    return partial(engine_batch_tps, engine, prompts, args.served_tokens), {}


def hf_batching_part(args: argparse.Namespace) -> dict[str, Any]:
    """Why the engine has its own scheduler: transformers' continuous batching
    against ours on 8 concurrent prompts, bf16, alternating."""
    results, _ = alternate(build_batching_contender, ["generate_batch", "quantserve"], args)
    result = {
        "generate_batch_tps": statistics.median(results["generate_batch"]),
        "quantserve_tps": statistics.median(results["quantserve"]),
    }
    result["ratio"] = result["quantserve_tps"] / result["generate_batch_tps"]
    print(f"\n8 prompts x {args.served_tokens} tokens, bf16, {args.threads} threads: "
          f"generate_batch {result['generate_batch_tps']:.1f} tok/s, quantserve engine "
          f"{result['quantserve_tps']:.1f} tok/s, ratio {result['ratio']:.2f}")
    return result


# --------------------------------------------------------------------- served
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


@dataclass
class Served:
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    e2e_p50: float
    e2e_p95: float
    errors: int
    short: int  # completed requests that streamed fewer tokens than asked


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def served_load(base_url: str, model: str, clients: int, rounds: int, tokens: int) -> Served:
    """`clients` threads, each streaming `rounds` completions one after another."""
    from openai import OpenAI

    ttfts: list[float] = []
    e2es: list[float] = []
    counts: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    topics = ["a dragon", "the sea", "a clockmaker", "winter", "a lost key", "the moon"]

    def client(index: int) -> None:
        try:
            stream_rounds(index)
        except Exception as exc:  # a failed request is reported, not fatal to the run
            with lock:
                errors.append(repr(exc))

    def stream_rounds(index: int) -> None:
        api = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
        for round_ in range(rounds):
            topic = topics[(index + round_) % len(topics)]
            start = time.perf_counter()
            first = None
            produced = 0
            usage = None
            # ignore_eos (vLLM's and llama-server's extension): every answer
            # is `tokens` long, whichever text each server's greedy decode
            # produces, so the servers do the same work.
            stream = api.completions.create(
                model=model, prompt=f"Write a long story about {topic}.\n\n",
                max_tokens=tokens, temperature=0.0, stream=True,
                extra_body={"ignore_eos": True},
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    produced += 1
                    if first is None:
                        first = time.perf_counter()
                if getattr(chunk, "usage", None):
                    usage = chunk.usage.completion_tokens
            end = time.perf_counter()
            with lock:
                ttfts.append((first or end) - start)
                e2es.append(end - start)
                counts.append(usage or produced)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if not counts:
        raise RuntimeError(f"every request to {base_url} failed: {errors[:1]}")
    return Served(
        sum(counts) / wall, percentile(ttfts, 0.5), percentile(ttfts, 0.95),
        percentile(e2es, 0.5), percentile(e2es, 0.95), len(errors),
        sum(count < tokens for count in counts),
    )


GGUF_OF = {"int8": "Q8_0", "int4": "Q4_1"}


def served_pair(args: argparse.Namespace, variant: str) -> dict[str, dict[int, Served]]:
    """quantserve quantised to `variant` against llama-server on the matching
    GGUF (and llama-cpp-python's server when asked), clients levels alternating."""
    gguf = gguf_for(GGUF_OF[variant], args.llama_bin)
    slots = max(args.concurrency_levels)
    ours_port, llama_port, python_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "QUANTSERVE_MAX_BATCH": str(slots),
        "QUANTSERVE_NUM_THREADS": str(args.threads),  # the same cores as llama.cpp's
    }
    processes = {
        "quantserve": subprocess.Popen(
            [str(REPO / ".venv/bin/quantserve"), "serve", "--port", str(ours_port),
             "--quantize", variant, *args.serve_args.split()],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        "llama-server": start_llama_server(args.llama_bin, gguf, llama_port, args.threads, slots),
    }
    targets = {
        "quantserve": (f"http://127.0.0.1:{ours_port}", "/ready", "smollm2-135m-instruct"),
        "llama-server": (f"http://127.0.0.1:{llama_port}", "/health", "smollm2"),
    }
    if args.llama_cpp_python:
        processes["llama_cpp.server"] = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
             str(python_port), "--n_threads", str(args.threads), "--n_threads_batch",
             str(args.threads), "--n_ctx", "4096", "--model_alias", "smollm2",
             # Its default cuts a running stream short when a new request arrives;
             # queueing is its one-at-a-time behaviour.
             "--interrupt_requests", "False"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        targets["llama_cpp.server"] = (f"http://127.0.0.1:{python_port}", "/v1/models",
                                       "smollm2")
    try:
        for name, (url, ready, _) in targets.items():
            wait_ready(url + ready, processes[name], 900)
        for url, _, model in targets.values():
            served_load(f"{url}/v1", model, 1, 1, 8)  # one-off first-request costs
        table: dict[str, dict[int, Served]] = {name: {} for name in targets}
        for clients in args.concurrency_levels:
            for name, (url, _, model) in targets.items():
                table[name][clients] = served_load(f"{url}/v1", model, clients, args.rounds,
                                                   args.served_tokens)
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(30)
    return table


def served_part(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for variant in args.served_variants.split(","):
        table = served_pair(args, variant)
        print(f"\nserved {variant} vs {GGUF_OF[variant]}: {args.served_tokens} tokens per "
              f"request, {args.rounds} requests per client, quantserve `serve --quantize "
              f"{variant} {args.serve_args}`, llama-server `-np "
              f"{max(args.concurrency_levels)} -cb`, every server {args.threads} threads")
        print(f"{'server':<18}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}"
              f"{'e2e p50':>9}{'e2e p95':>9}{'errors':>8}{'short':>7}")
        for name, rows in table.items():
            for clients, r in rows.items():
                print(f"{name:<18}{clients:>8}{r.tokens_per_s:>9.1f}{r.ttft_p50:>10.2f}"
                      f"{r.ttft_p95:>10.2f}{r.e2e_p50:>9.2f}{r.e2e_p95:>9.2f}{r.errors:>8}"
                      f"{r.short:>7}")
        ours, theirs = table["quantserve"], table["llama-server"]
        ratios = {}
        for clients in args.concurrency_levels:
            ratios[f"{variant} {clients} clients tok/s vs llama-server (target >= 1)"] = (
                ours[clients].tokens_per_s / theirs[clients].tokens_per_s
            )
            ratios[f"{variant} {clients} clients p95 TTFT vs llama-server (target <= 1.5)"] = (
                ours[clients].ttft_p95 / max(theirs[clients].ttft_p95, 1e-9)
            )
        for name, value in ratios.items():
            print(f"ratio {name}: {value:.2f}")
        results[variant] = {
            "table": {n: {c: vars(r) for c, r in rows.items()} for n, rows in table.items()},
            "ratios": ratios,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=("decode", "served", "hf-batching", "all"), default="all"
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt-tokens", type=int, default=175)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", default="fp32,bf16,int8,int4")
    parser.add_argument("--compile", choices=("off", "on", "auto"), default="auto",
                        help="quantserve's compile setting (decode part; served: add "
                             "`--compile ...` to --serve-args)")
    parser.add_argument("--no-llama", dest="llama", action="store_false",
                        help="skip llama.cpp in the decode part")
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--served-tokens", type=int, default=64)
    parser.add_argument("--served-variants", default="int8,int4",
                        help="quantserve methods served, each against its matching GGUF")
    parser.add_argument("--serve-args", default="",
                        help="extra arguments of `quantserve serve`")
    parser.add_argument("--llama-bin", type=Path,
                        default=Path.home() / ".cache/quantserve/llama.cpp/build/bin",
                        help="folder of llama.cpp's llama-server and llama-quantize "
                             "(bash scripts/build_llama_cpp.sh prints it)")
    parser.add_argument("--llama-cpp-python", action="store_true",
                        help="served: add `python -m llama_cpp.server` as a second row")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(f"Machine: {describe_machine(args.threads or None)}", flush=True)
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, Any] = {"threads": args.threads, "argv": sys.argv[1:]}
    if args.part in ("decode", "all"):
        results["decode"] = decode_part(args)
    if args.part in ("hf-batching", "all"):
        results["hf_batching"] = hf_batching_part(args)
    if args.part in ("served", "all"):
        results["served"] = served_part(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Generation speed: quantserve's engine against plain `generate` and llama.cpp.

Two parts, both alternating contenders inside one run so that load from other
processes hits them alike (report ratios, not absolute figures):

* `decode`: batch-1 prefill and decode tokens/s. quantserve's engine (fp32,
  bf16, int8, int4 g128) against transformers' `generate` (fp32, bf16) and
  llama-cpp-python on the embedded GGUF (Q4_1) and a Q8_0 requantised from it.
* `hf-batching`: transformers' own continuous batching (`generate_batch`)
  against the engine on 8 concurrent prompts, the measurement behind writing
  our own scheduler.
* `served`: N concurrent official `openai` clients streaming completions from
  `quantserve serve` and from `python -m llama_cpp.server` on the same GGUF:
  total generated tokens/s, TTFT and end-to-end latency percentiles.

    .venv/bin/pip install -e '.[bench]'     # llama-cpp-python: ~10 min build
    .venv/bin/python bench/serve_bench.py --part all --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
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
from quantizers.evaluation.machine import describe_machine  # noqa: E402
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


def llama_speed(llm: Any, ids: list[int], tokens: int, eos: int) -> Speed:
    """llama.cpp on the same token ids; EOS banned so it decodes `tokens` tokens."""
    llm.reset()
    start = time.perf_counter()
    llm.create_completion(ids, max_tokens=1, temperature=0.0)
    prefill = time.perf_counter() - start
    llm.reset()
    start = time.perf_counter()
    out = llm.create_completion(
        ids, max_tokens=tokens, temperature=0.0, logit_bias={eos: -1e9}
    )
    total = time.perf_counter() - start
    produced = out["usage"]["completion_tokens"]
    return Speed(len(ids) / prefill, (produced - 1) / max(total - prefill, 1e-9))


def requantize_q8(gguf: Path, workdir: Path) -> Path:
    """A Q8_0 GGUF requantised from the Q4_1 one (cached between runs)."""
    import llama_cpp

    target = workdir / (gguf.stem.replace("Q4_1", "Q8_0") + ".gguf")
    if target.is_file():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(
        str(gguf).encode(), str(target).encode(), params
    )
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed with {status}")
    return target


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
        from llama_cpp import Llama

        workdir = Path(tempfile.gettempdir()) / "quantserve-bench"
        workdir.mkdir(exist_ok=True)
        path = base.source if name == "Q4_1" else requantize_q8(base.source, workdir)
        eos = int(base.tokenizer.eos_token_id)
        llm = Llama(model_path=str(path), n_ctx=1024, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)
        measure = partial(llama_speed, llm, ids, args.tokens, eos)
    elif kind == "generate":
        model = variant_model(base, name).model
        measure = partial(generate_speed, model, ids, args.tokens)
    else:
        engine = Engine(variant_model(base, name), max_num_seqs=1, max_model_len=1024,
                        num_threads=args.threads, compile=args.compile)
        engine.start()  # compilation and warm-up happen here, outside the timed runs
        extra = engine.stats().extra
        info = {k: extra[k] for k in ("warmup_seconds", "compile_seconds", "decode_compiled")}
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
    raw, infos = alternate(build_contender, labels, args)
    results = {label: [Speed(*row) for row in rows] for label, rows in raw.items()}
    warmups = {label.split(" ", 1)[1]: info for label, info in infos.items() if info}
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
              f"{info['compile_seconds']:.1f} s (decode "
              f"{'compiled' if info['decode_compiled'] else 'eager'})")
    print(f"\nbatch-1, prompt {args.prompt_tokens} tokens, {args.tokens} greedy tokens, "
          f"{args.threads} threads, median of {args.reps} (alternating)")
    print(f"{'contender':<22}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, row in table.items():
        print(f"{name:<22}{row['prefill_tps']:>15.1f}{row['decode_tps']:>15.1f}")
    ratios = decode_ratios(table)
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    return {"table": table, "ratios": ratios, "warmup": warmups}


def decode_ratios(table: dict[str, dict[str, float]]) -> dict[str, float]:
    pairs = {
        "bf16 decode vs generate bf16 (target >= 2)": ("quantserve bf16", "generate bf16"),
        "fp32 decode vs generate fp32": ("quantserve fp32", "generate fp32"),
        "int8 decode vs llama.cpp Q8_0 (target >= 0.5)": ("quantserve int8", "llama.cpp Q8_0"),
        "int4 decode vs llama.cpp Q4_1 (target >= 0.5)": ("quantserve int4", "llama.cpp Q4_1"),
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
            stream = api.completions.create(
                model=model, prompt=f"Write a long story about {topic}.\n\n",
                max_tokens=tokens, temperature=0.0, stream=True,
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


def served_part(args: argparse.Namespace) -> dict[str, Any]:
    from quantizers.loading import embedded_model_path

    gguf = embedded_model_path()
    ours_port, llama_port = free_port(), free_port()
    env = {
        **os.environ,
        "QUANTSERVE_MAX_BATCH": str(max(args.concurrency_levels)),
        "QUANTSERVE_NUM_THREADS": str(args.threads),  # the same cores as llama.cpp's
    }
    ours = subprocess.Popen(
        [str(REPO / ".venv/bin/quantserve"), "serve", "--port", str(ours_port),
         *args.serve_args.split()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    llama = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
         str(llama_port), "--n_threads", str(args.threads), "--n_threads_batch",
         str(args.threads), "--n_ctx", "4096", "--model_alias", "smollm2",
         # Its default cuts a running stream short when a new request arrives;
         # queueing is its one-at-a-time behaviour the comparison is about.
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{ours_port}/ready", ours, 900)
        wait_ready(f"http://127.0.0.1:{llama_port}/v1/models", llama, 300)
        targets = {
            "quantserve": (f"http://127.0.0.1:{ours_port}/v1", "smollm2-135m-instruct"),
            "llama.cpp server": (f"http://127.0.0.1:{llama_port}/v1", "smollm2"),
        }
        for url, model in targets.values():
            served_load(url, model, 1, 1, 8)  # first request's one-off costs stay out of the table
        table: dict[str, dict[int, Served]] = {name: {} for name in targets}
        for clients in args.concurrency_levels:
            for name, (url, model) in targets.items():
                table[name][clients] = served_load(url, model, clients, args.rounds,
                                                   args.served_tokens)
    finally:
        for process in (ours, llama):
            process.terminate()
            process.wait(30)
    print(f"\nserved: {args.served_tokens} tokens per request, {args.rounds} requests per "
          f"client, quantserve `serve {args.serve_args}`, both servers {args.threads} threads")
    print(f"{'server':<18}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}"
          f"{'e2e p50':>9}{'e2e p95':>9}{'errors':>8}{'short':>7}")
    for name, rows in table.items():
        for clients, r in rows.items():
            print(f"{name:<18}{clients:>8}{r.tokens_per_s:>9.1f}{r.ttft_p50:>10.2f}"
                  f"{r.ttft_p95:>10.2f}{r.e2e_p50:>9.2f}{r.e2e_p95:>9.2f}{r.errors:>8}"
                  f"{r.short:>7}")
    ratios = {
        f"{clients} clients tok/s vs llama.cpp server (target >= 3 at 8)": (
            table["quantserve"][clients].tokens_per_s
            / table["llama.cpp server"][clients].tokens_per_s
        )
        for clients in args.concurrency_levels
    }
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    return {
        "table": {n: {c: vars(r) for c, r in rows.items()} for n, rows in table.items()},
        "ratios": ratios,
    }


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
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--served-tokens", type=int, default=64)
    parser.add_argument("--serve-args", default="--quantize int4",
                        help="extra arguments of `quantserve serve`")
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

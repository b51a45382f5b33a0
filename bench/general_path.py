"""The general runner (transformers' modules over the paged cache) on a real model.

Serves a local model with `--runner general` and measures, against
transformers' own forward and `generate` in this process:

* perplexity over HTTP (`echo` + `logprobs` on the prompt) against
  transformers' perplexity on the same windows, float32; then the int8
  variant's perplexity over HTTP against the float one;
* `served`: decode tokens/s of one streaming client, and total tokens/s of
  8 concurrent clients, against `generate` at batch 1, alternating rounds so
  that load from other processes hits both alike (report the ratios); by
  wall time and by CPU time (the server process's, HTTP and all, against
  this process's for `generate`);
* `quant`: each of `--methods` quantised at start-up (cold), then started
  again from the artifact cache: seconds to ready, the server's peak RSS
  (quantisation included) and perplexity over HTTP against the float one;
* `cpu`: the decode comparison in process by CPU time (`process_time`), the
  general runner's decode at batch 1 and 8 against `generate`: on a machine
  shared with other loads, wall time measures the neighbours, CPU time less so.

The default model is the embedded SmolLM2 (a Llama) forced onto the general
path; `--model` takes any local GGUF or HF directory, e.g. Gemma 3 270M
fetched by bench/bench_models.py:

    GEMMA=$(.venv/bin/python bench/bench_models.py gemma-3-270m)
    .venv/bin/python bench/general_path.py --model "$GEMMA" --threads 2 --methods int8,int4,gptq
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantizers.evaluation.machine import describe_machine  # noqa: E402
from quantizers.evaluation.wikitext import wikitext_tokens  # noqa: E402
from quantizers.loading import LoadedModel, load_model  # noqa: E402
from server.engine.hf_runner import GeneralRunner  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402

PARTS = ("ppl", "served", "quant", "cpu")
_TICKS = os.sysconf("SC_CLK_TCK")


def post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class Server:
    """`quantserve serve` of this checkout in a subprocess."""

    def __init__(
        self, model: str | None, threads: int, cache_dir: Path, env: dict[str, str]
    ) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = Path(tempfile.mkdtemp(prefix="general-path-")) / "server.log"
        full = {
            **os.environ,
            "QUANTSERVE_RUNNER": "general",
            "QUANTSERVE_DTYPE": "float32",
            "QUANTSERVE_CACHE_DIR": str(cache_dir),
            "QUANTSERVE_NUM_THREADS": str(threads),
            "QUANTSERVE_MODEL_ID": "m",
            "QUANTSERVE_MAX_NUM_SEQS": "8",
            **env,
        }
        if model:
            full["QUANTSERVE_MODEL"] = model
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)],
                cwd=REPO,
                env=full,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"
        # A cold GPTQ start on a loaded 2-core machine took over 15 minutes.
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready within an hour; log: {self.log}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def peak_rss_mib(self) -> float:
        """The server process's peak resident memory (VmHWM), MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def path_line(self) -> str:
        lines = self.log.read_text().splitlines()
        return next((line for line in lines if "runner serves" in line), "?")


def windows(tokens: torch.Tensor, count: int, length: int) -> list[list[int]]:
    return [tokens[i * length : (i + 1) * length].tolist() for i in range(count)]


def http_nll(server: Server, chunks: list[list[int]]) -> tuple[float, int]:
    """Summed negative log-likelihood of every token after the first of each chunk."""
    total, count = 0.0, 0
    for chunk in chunks:
        body = {
            "model": "m",
            "prompt": chunk,
            "max_tokens": 1,
            "echo": True,
            "logprobs": 0,
            "temperature": 0,
        }
        logprobs = post(f"{server.url}/v1/completions", body)["choices"][0]["logprobs"]
        prompt = logprobs["token_logprobs"][1 : len(chunk)]
        total -= sum(prompt)
        count += len(prompt)
    return total, count


def hf_nll(loaded: LoadedModel, chunks: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            logits = loaded.model(ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += float(nll)
            count += len(chunk) - 1
    return total, count


def stream_tokens(server: Server, prompt: list[int], tokens: int) -> tuple[int, float]:
    """Tokens generated by one streaming request and the seconds from first to last."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        f"{server.url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    stamps = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return len(stamps), stamps[-1] - stamps[0]


def served_speed(server: Server, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Total decode tokens/s of len(prompts) concurrent streaming clients, and
    the server's CPU seconds per generated token (prefill included)."""
    cpu = server.cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: stream_tokens(server, p, tokens), prompts))
    wall = time.perf_counter() - started
    generated = sum(count for count, _ in results)
    per_token = (server.cpu_seconds() - cpu) / generated
    if len(prompts) == 1:
        count, seconds = results[0]
        return (count - 1) / seconds, per_token
    return generated / wall, per_token


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def generate_seconds(loaded: LoadedModel, prompt: list[int], tokens: int) -> tuple[float, float]:
    """Wall and CPU seconds per decode token of transformers' `generate` at
    batch 1 (a one-token run is timed apart and taken off as the prefill)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = _clocks()
        loaded.model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = [b - a for a, b in zip(start, _clocks(), strict=True)]
        start = _clocks()
        loaded.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        wall, cpu = (
            (b - a - p) / (tokens - 1) for a, b, p in zip(start, _clocks(), prefill, strict=True)
        )
        return wall, cpu


def runner_cpu(runner: GeneralRunner, prompts: list[list[int]], tokens: int) -> float:
    """CPU seconds per generated token of the general runner decoding `prompts` together."""
    per_sequence = -(-(max(map(len, prompts)) + tokens + 1) // 16)
    cache = KVCache(runner.kv_spec, per_sequence * len(prompts), 16)
    tables = [list(range(i * per_sequence, (i + 1) * per_sequence)) for i in range(len(prompts))]
    last = [
        int(runner.prefill(cache, t, p)[-1].argmax()) for t, p in zip(tables, prompts, strict=True)
    ]
    positions = [len(p) for p in prompts]
    batch = torch.tensor(last)
    start = time.process_time()
    for _ in range(tokens):
        batch = runner.decode(cache, batch, positions, tables).argmax(-1)
        positions = [p + 1 for p in positions]
    return (time.process_time() - start) / (tokens * len(prompts))


def cpu_part(loaded: LoadedModel, prompts: list[list[int]], tokens: int, rounds: int) -> None:
    runner = GeneralRunner(loaded.model)
    rows = []
    for round_ in range(rounds):
        hf = generate_seconds(loaded, prompts[0], tokens)[1]
        one = runner_cpu(runner, prompts[:1], tokens)
        eight = runner_cpu(runner, prompts, tokens)
        rows.append((hf, one, eight))
        print(
            f"round {round_} (CPU ms per token): generate {1e3 * hf:.1f}, general runner "
            f"batch 1 {1e3 * one:.1f} ({hf / one:.2f}x), batch 8 {1e3 * eight:.1f} "
            f"({hf / eight:.2f}x)",
            flush=True,
        )
    hf, one, eight = (sorted(col)[len(col) // 2] for col in zip(*rows, strict=True))
    print(
        f"median: general runner batch 1 {hf / one:.2f}x generate's tokens per CPU second, "
        f"batch 8 {hf / eight:.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local GGUF / HF dir (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows")
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--methods", default="int8", help="the quant part's methods")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    print(f"Machine: {describe_machine(args.threads)}", flush=True)
    loaded = load_model(args.model, dtype=torch.float32)
    tokens = wikitext_tokens(loaded.tokenizer, args.windows * args.window_len)
    chunks = windows(tokens, args.windows, args.window_len)
    prompts = [chunk[:32] for chunk in chunks[:8]]

    if "cpu" in parts:
        cpu_part(loaded, prompts, args.tokens, args.rounds)
    float_ppl = None
    if parts & {"ppl", "served"}:
        cache_dir = Path(tempfile.mkdtemp(prefix="general-path-cache-"))
        server = Server(args.model, args.threads, cache_dir, {})
        try:
            print(f"float32: {server.path_line()}", flush=True)
            print(f"float32 server peak RSS {server.peak_rss_mib():.0f} MiB", flush=True)
            if "ppl" in parts:
                float_ppl = perplexity_part(server, loaded, chunks)
            if "served" in parts:
                served_part(server, loaded, prompts, args.tokens, args.rounds)
        finally:
            server.stop()
    if "quant" in parts:
        quant_part(args.model, args.threads, chunks, args.methods.split(","), float_ppl)


def perplexity_part(server: Server, loaded: LoadedModel, chunks: list[list[int]]) -> float:
    nll, count = http_nll(server, chunks)
    ref_nll, ref_count = hf_nll(loaded, chunks)
    assert count == ref_count
    ppl_http, ppl_hf = math.exp(nll / count), math.exp(ref_nll / ref_count)
    print(
        f"perplexity over {count} tokens: HTTP {ppl_http:.4f}, transformers "
        f"{ppl_hf:.4f}, ratio {ppl_http / ppl_hf:.5f}",
        flush=True,
    )
    return ppl_http


def served_part(
    server: Server, loaded: LoadedModel, prompts: list[list[int]], tokens: int, rounds: int
) -> None:
    rows = []
    for round_ in range(rounds):
        hf_wall, hf_cpu = generate_seconds(loaded, prompts[0], tokens)
        hf = 1 / hf_wall
        one, one_cpu = served_speed(server, prompts[:1], tokens)
        eight, eight_cpu = served_speed(server, prompts, tokens)
        rows.append((one / hf, eight / hf, hf_cpu / one_cpu, hf_cpu / eight_cpu))
        print(
            f"round {round_}: generate {hf:.1f} tok/s, served 1 client {one:.1f} "
            f"({one / hf:.2f}x), 8 clients {eight:.1f} total ({eight / hf:.2f}x); CPU ms per "
            f"token: generate {1e3 * hf_cpu:.1f}, server 1 client {1e3 * one_cpu:.1f} "
            f"({hf_cpu / one_cpu:.2f}x), 8 clients {1e3 * eight_cpu:.1f} "
            f"({hf_cpu / eight_cpu:.2f}x)",
            flush=True,
        )
    one, eight, one_cpu, eight_cpu = (sorted(c)[len(c) // 2] for c in zip(*rows, strict=True))
    print(
        f"median vs generate: wall 1 client {one:.2f}x, 8 clients {eight:.2f}x; "
        f"tokens per CPU second 1 client {one_cpu:.2f}x, 8 clients {eight_cpu:.2f}x",
        flush=True,
    )


def quant_part(
    model: str | None,
    threads: int,
    chunks: list[list[int]],
    methods: list[str],
    float_ppl: float | None,
) -> None:
    """Each method quantised at start-up, then loaded from the artifact cache."""
    for method in methods:
        cache_dir = Path(tempfile.mkdtemp(prefix=f"general-path-{method}-"))
        ppls = []
        for start in ("cold", "cache hit"):
            began = time.monotonic()
            server = Server(model, threads, cache_dir, {"QUANTSERVE_QUANTIZE": method})
            ready = time.monotonic() - began
            try:
                nll, count = http_nll(server, chunks)
                ppls.append(math.exp(nll / count))
                versus = (
                    f" ({100 * (ppls[-1] / float_ppl - 1):+.2f}% vs float)" if float_ppl else ""
                )
                print(
                    f"{method} {start}: ready in {ready:.0f} s, server peak RSS "
                    f"{server.peak_rss_mib():.0f} MiB, perplexity over HTTP "
                    f"{ppls[-1]:.4f}{versus}; {server.path_line()}",
                    flush=True,
                )
            finally:
                server.stop()
        print(
            f"{method}: cache hit serves the cold start's perplexity: {ppls[0] == ppls[1]}",
            flush=True,
        )


if __name__ == "__main__":
    main()

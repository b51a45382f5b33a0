"""The general runner (transformers' modules over the paged cache) on a real model.

Serves a local model with `--runner general` and measures, against
transformers' own forward and `generate` in this process:

* perplexity over HTTP (`echo` + `logprobs` on the prompt) against
  transformers' perplexity on the same windows, float32; then the int8
  variant's perplexity over HTTP against the float one;
* decode tokens/s of one streaming client, and total tokens/s of 8 concurrent
  clients, against `generate` at batch 1, alternating rounds so that load
  from other processes hits both alike (report the ratios);
* `cpu`: the same comparison in process by CPU time (`process_time`), the
  general runner's decode at batch 1 and 8 against `generate`: on a machine
  shared with other loads, wall time measures the neighbours, CPU time less so.

No non-Llama model small enough ships in a package here, so the default is
the embedded SmolLM2 (a Llama) forced onto the general path; any local GGUF
or HF directory can be given with --model.

    .venv/bin/python bench/general_path.py --threads 2
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
from collections.abc import Callable
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

PARTS = ("ppl", "served", "int8", "cpu")


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
        full = {**os.environ, "QUANTSERVE_RUNNER": "general", "QUANTSERVE_DTYPE": "float32",
                "QUANTSERVE_CACHE_DIR": str(cache_dir),
                "QUANTSERVE_NUM_THREADS": str(threads), "QUANTSERVE_MODEL_ID": "m",
                "QUANTSERVE_MAX_NUM_SEQS": "8", **env}
        if model:
            full["QUANTSERVE_MODEL"] = model
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)],
                cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 900
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
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    def path_line(self) -> str:
        lines = self.log.read_text().splitlines()
        return next((line for line in lines if "runner serves" in line), "?")


def windows(tokens: torch.Tensor, count: int, length: int) -> list[list[int]]:
    return [tokens[i * length : (i + 1) * length].tolist() for i in range(count)]


def http_nll(server: Server, chunks: list[list[int]]) -> tuple[float, int]:
    """Summed negative log-likelihood of every token after the first of each chunk."""
    total, count = 0.0, 0
    for chunk in chunks:
        body = {"model": "m", "prompt": chunk, "max_tokens": 1, "echo": True, "logprobs": 0,
                "temperature": 0}
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
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True}
    request = urllib.request.Request(
        f"{server.url}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    stamps = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return len(stamps), stamps[-1] - stamps[0]


def served_speed(server: Server, prompts: list[list[int]], tokens: int) -> float:
    """Total decode tokens/s of len(prompts) concurrent streaming clients."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: stream_tokens(server, p, tokens), prompts))
    if len(prompts) == 1:
        count, seconds = results[0]
        return (count - 1) / seconds
    return sum(count for count, _ in results) / (time.perf_counter() - started)


def _generate_decode_seconds(
    loaded: LoadedModel, prompt: list[int], tokens: int, clock: Callable[[], float]
) -> float:
    """`clock` seconds per decode token of transformers' `generate` at batch 1
    (a one-token run is timed apart and taken off as the prefill)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = clock()
        loaded.model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = clock() - start
        start = clock()
        loaded.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False)
        return (clock() - start - prefill) / (tokens - 1)


def generate_speed(loaded: LoadedModel, prompt: list[int], tokens: int) -> float:
    """transformers' `generate` decode tokens/s at batch 1 (prefill timed apart)."""
    return 1.0 / _generate_decode_seconds(loaded, prompt, tokens, time.perf_counter)


def generate_cpu(loaded: LoadedModel, prompt: list[int], tokens: int) -> float:
    """CPU seconds per decode token of `generate` at batch 1."""
    return _generate_decode_seconds(loaded, prompt, tokens, time.process_time)


def runner_cpu(runner: GeneralRunner, prompts: list[list[int]], tokens: int) -> float:
    """CPU seconds per generated token of the general runner decoding `prompts` together."""
    per_sequence = -(-(max(map(len, prompts)) + tokens + 1) // 16)
    cache = KVCache(runner.kv_spec, per_sequence * len(prompts), 16)
    tables = [list(range(i * per_sequence, (i + 1) * per_sequence))
              for i in range(len(prompts))]
    last = [int(runner.prefill(cache, t, p)[-1].argmax())
            for t, p in zip(tables, prompts, strict=True)]
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
        hf = generate_cpu(loaded, prompts[0], tokens)
        one = runner_cpu(runner, prompts[:1], tokens)
        eight = runner_cpu(runner, prompts, tokens)
        rows.append((hf, one, eight))
        print(f"round {round_} (CPU ms per token): generate {1e3 * hf:.1f}, general runner "
              f"batch 1 {1e3 * one:.1f} ({hf / one:.2f}x), batch 8 {1e3 * eight:.1f} "
              f"({hf / eight:.2f}x)", flush=True)
    hf, one, eight = (sorted(col)[len(col) // 2] for col in zip(*rows, strict=True))
    print(f"median: general runner batch 1 {hf / one:.2f}x generate's tokens per CPU second, "
          f"batch 8 {hf / eight:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local GGUF / HF dir (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows")
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
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
    cache_dir = Path(tempfile.mkdtemp(prefix="general-path-cache-"))
    float_ppl = None
    if parts & {"ppl", "served"}:
        server = Server(args.model, args.threads, cache_dir, {})
        try:
            print(f"float32: {server.path_line()}", flush=True)
            if "ppl" in parts:
                float_ppl = perplexity_part(server, loaded, chunks)
            if "served" in parts:
                served_part(server, loaded, prompts, args.tokens, args.rounds)
        finally:
            server.stop()
    if "int8" in parts:
        server = Server(args.model, args.threads, cache_dir, {"QUANTSERVE_QUANTIZE": "int8"})
        try:
            print(f"int8: {server.path_line()}", flush=True)
            nll8, count8 = http_nll(server, chunks)
            ppl8 = math.exp(nll8 / count8)
            versus = f"{100 * (ppl8 / float_ppl - 1):+.2f}% vs float" if float_ppl else ""
            print(f"int8 perplexity over HTTP {ppl8:.4f} {versus}", flush=True)
        finally:
            server.stop()


def perplexity_part(server: Server, loaded: LoadedModel, chunks: list[list[int]]) -> float:
    nll, count = http_nll(server, chunks)
    ref_nll, ref_count = hf_nll(loaded, chunks)
    assert count == ref_count
    ppl_http, ppl_hf = math.exp(nll / count), math.exp(ref_nll / ref_count)
    print(f"perplexity over {count} tokens: HTTP {ppl_http:.4f}, transformers "
          f"{ppl_hf:.4f}, ratio {ppl_http / ppl_hf:.5f}", flush=True)
    return ppl_http


def served_part(
    server: Server, loaded: LoadedModel, prompts: list[list[int]], tokens: int, rounds: int
) -> None:
    rows = []
    for round_ in range(rounds):
        hf = generate_speed(loaded, prompts[0], tokens)
        one = served_speed(server, prompts[:1], tokens)
        eight = served_speed(server, prompts, tokens)
        rows.append((hf, one, eight))
        print(f"round {round_}: generate {hf:.1f} tok/s, served 1 client {one:.1f} "
              f"({one / hf:.2f}x), 8 clients {eight:.1f} total ({eight / hf:.2f}x)",
              flush=True)
    hf, one, eight = (sorted(col)[len(col) // 2] for col in zip(*rows, strict=True))
    print(f"median: 1 client {one / hf:.2f}x generate, 8 clients {eight / hf:.2f}x",
          flush=True)


if __name__ == "__main__":
    main()

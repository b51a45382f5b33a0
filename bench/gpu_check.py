"""GPU check: every method served on CUDA, against the float model and `generate`.

On a machine with a CUDA GPU (it refuses to run without one, exit code 2):

    .venv/bin/python bench/gpu_check.py            # ~10 minutes on one GPU

1. The float model (embedded SmolLM2, bf16) is loaded here on the GPU: its greedy
   continuations of a few prompts are the reference, and transformers'
   `generate` gives the baseline decode speed (one stream, same GPU).
   The int8 weight-only kernel choice is timed too: torch's `_weight_int8pack_mm`
   (when it has a CUDA kernel) against the cast-and-matmul the runtime uses.
2. For each method a real `quantserve serve --device cuda --quantize METHOD`
   starts (its own process, a fresh artifact cache), and the official `openai`
   client sends the prompts as token ids: the greedy text is compared with the
   reference (how many of the first tokens agree), one stream's decode tokens/s
   is timed against `generate`, and 8 concurrent streams give the throughput.
   The server's log says whether the decode step runs as CUDA graphs, and
   /metrics gives the GPU memory it holds.
3. On the float server, a quantisation job (GPTQ, or int4 when the calibration
   text is missing) runs on the GPU while two clients keep sending requests:
   every request must succeed, and the swapped-in variant is checked like the
   others.

Everything goes into one table. A step that fails is reported in its row and the
run goes on; the exit code is 1 when any check failed. Steps that would not fit
in `--budget-s` are skipped and say so. `--device cpu` runs the same steps on
the CPU (slowly, no CUDA graphs): a check of this script, not of the GPU path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantizers.evaluation.machine import describe_machine  # noqa: E402
from quantizers.loading import load_model  # noqa: E402

TOKEN = "gpu-check-admin"
PROMPTS = [
    "The capital of France is",
    "Write a short story about a lighthouse keeper.",
    "def fibonacci(n):",
    "List three uses of copper:",
]
STORY = "Write a long story about the sea and the sailors who live by it.\n\n"
METHODS = ["float", "int8", "int4", "w8a8-dynamic", "bnb-nf4", "bnb-int8"]
STARTUP_TIMEOUT_S = 300


@dataclass
class Row:
    variant: str
    startup_s: float | None = None
    agree: str = "-"
    decode_tps: float | None = None
    vs_generate: float | None = None
    batch_tps: float | None = None
    cuda_graphs: str = "-"
    gpu_mib: float | None = None
    ok: bool = True
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------- the machine
def machine() -> str:
    host = describe_machine()
    if not torch.cuda.is_available():
        return f"CPU: {host}; no GPU"
    gpu = torch.cuda.get_device_properties(0)
    return (f"GPU: {gpu.name}, {gpu.total_memory / 2**30:.0f} GiB, capability "
            f"{gpu.major}.{gpu.minor}, CUDA {torch.version.cuda}\nCPU: {host}")


# ------------------------------------------------------ reference and baseline
class _Timing:
    """A `generate` streamer that notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def reference(
    device: str, tokens: int, decode_tokens: int
) -> tuple[list[list[int]], dict[str, Any], float]:
    """Greedy continuations of PROMPTS by the float model on `device`, the
    tokenizer, and `generate`'s single-stream decode tokens/s (best of 3)."""
    loaded = load_model(None, dtype="bfloat16", device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    continuations = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
            new = out[0, len(ids):].tolist()
            # up to the end of text: the server stops there and sends no text for it
            stops = [i for i, t in enumerate(new) if t == tokenizer.eos_token_id]
            continuations.append(new[: stops[0]] if stops else new)
        story = torch.tensor([tokenizer.encode(STORY)], device=device)
        best = 0.0
        for _ in range(3):
            timing = _Timing()
            model.generate(story, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                           do_sample=False, streamer=timing, pad_token_id=tokenizer.eos_token_id)
            if len(timing.times) > 1:
                rate = (len(timing.times) - 1) / (timing.times[-1] - timing.times[0])
                best = max(best, rate)
    del model, loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return continuations, {"tokenizer": tokenizer, "prompts": prompts}, best


def agreeing_tokens(tokenizer: Any, text: str, want: list[int]) -> int:
    """How many of the reference tokens the served text starts with."""
    count = 0
    for j in range(1, len(want) + 1):
        if not text.startswith(tokenizer.decode(want[:j])):
            break
        count = j
    return count


def int8_kernels(device: str) -> str:
    """The int8 weight-only choice on this GPU: torch's `_weight_int8pack_mm`
    (if it has a CUDA kernel) against the cast-and-matmul the runtime uses,
    eager, at a SmolLM2 MLP shape and one row (decode)."""
    if device != "cuda":
        return "int8 kernels: not timed off CUDA"
    x = torch.randn(1, 576, dtype=torch.bfloat16, device=device)
    weight = torch.randint(-127, 127, (1536, 576), dtype=torch.int8, device=device)
    scale = torch.rand(1536, dtype=torch.bfloat16, device=device)

    def dequant() -> torch.Tensor:
        return torch.nn.functional.linear(x, weight.to(x.dtype)) * scale

    def packed() -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, weight, scale)

    times = {}
    for name, fn in (("cast+matmul", dequant), ("_weight_int8pack_mm", packed)):
        try:
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            times[name] = f"{(time.perf_counter() - start) / 200 * 1e6:.1f} us"
        except Exception as exc:  # no CUDA kernel for it: that is the finding
            times[name] = f"unavailable ({type(exc).__name__})"
    return "int8 weight-only, 1 x 576 @ 576 x 1536, eager: " + ", ".join(
        f"{name} {value}" for name, value in times.items())


# ------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def http(url: str, data: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    request = urllib.request.Request(
        url, data=None if data is None else json.dumps(data).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="GET" if data is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body.decode()


@contextmanager
def serve(args: list[str], workdir: Path, name: str, device: str) -> Iterator[Server]:
    port = free_port()
    log = workdir / f"{name}.log"
    env = {**os.environ, "QUANTSERVE_ADMIN_TOKEN": TOKEN,
           "QUANTSERVE_CACHE_DIR": str(workdir / f"cache-{name}")}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
             "--device", device, *args],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                tail = server.log_text().strip().splitlines()[-3:]
                raise RuntimeError(f"server exited with {process.returncode}: {' | '.join(tail)}")
            try:
                http(server.base + "/ready", timeout=2)
                break
            except (OSError, urllib.error.HTTPError):
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready in time") from None
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def cuda_graphs_state(log: str) -> str:
    if "skipped CUDA graphs" in log:
        return "skipped"
    if "torch.compile" in log and "failed" in log:
        return "compile failed"
    if "compiled, CUDA graphs" in log:
        return "yes"
    return "no" if "decode eager" in log or "decode compiled" in log else "?"


def gpu_mib(server: Server) -> float | None:
    text = http(server.base + "/metrics")
    found = re.search(r'^quantserve_cuda_memory_allocated_bytes\{device="cuda:0"\} (\S+)',
                      str(text), re.MULTILINE)
    return float(found.group(1)) / 2**20 if found else None


# ------------------------------------------------------------------ the checks
def openai_client(server: Server) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key="gpu-check", max_retries=0, timeout=120)


def check_greedy(api: Any, model: str, ref: dict[str, Any], want: list[list[int]]) -> list[int]:
    agree = []
    for ids, expected in zip(ref["prompts"], want, strict=True):
        if not expected:  # the float model ends the text at once: nothing to compare
            agree.append(0)
            continue
        reply = api.completions.create(model=model, prompt=ids, max_tokens=len(expected),
                                       temperature=0.0)
        agree.append(agreeing_tokens(ref["tokenizer"], reply.choices[0].text, expected))
    return agree


def stream_tps(api: Any, model: str, prompt: list[int], tokens: int) -> float:
    """One stream's decode rate: tokens after the first over the time after it."""
    best = 0.0
    for _ in range(3):
        first = last = None
        used = 0
        stream = api.completions.create(model=model, prompt=prompt, max_tokens=tokens,
                                        temperature=0.0, stream=True,
                                        stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                last = time.perf_counter()
                first = first or last
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        if first is not None and last is not None and last > first and used > 1:
            best = max(best, (used - 1) / (last - first))
    return best


def batch_tps(api: Any, model: str, prompt: list[int], tokens: int, streams: int = 8) -> float:
    counts = [0] * streams

    def one(index: int) -> None:
        reply = api.completions.create(model=model, prompt=prompt, max_tokens=tokens,
                                       temperature=0.0)
        counts[index] = reply.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def measure(row: Row, server: Server, ref: dict[str, Any], want: list[list[int]],
            generate_tps: float, tokens: int) -> None:
    api = openai_client(server)
    model = api.models.list().data[0].id
    agree = check_greedy(api, model, ref, want)
    lengths = [len(w) for w in want]
    row.agree = f"{sum(agree)}/{sum(lengths)}"
    # bf16 kernels (fused, compiled) may flip a near-tie later on; a wrong device
    # path gives garbage from the first token.
    first_differs = [i for i, (a, n) in enumerate(zip(agree, lengths, strict=True))
                     if a == 0 and n > 0]
    if first_differs:
        row.notes.append(f"first token differs from float on prompts {first_differs}")
        if row.variant == "float":
            row.ok = False
    story = ref["tokenizer"].encode(STORY)
    row.decode_tps = stream_tps(api, model, story, tokens)
    row.vs_generate = row.decode_tps / generate_tps if generate_tps else None
    row.batch_tps = batch_tps(api, model, story, tokens)
    row.cuda_graphs = cuda_graphs_state(server.log_text())
    row.gpu_mib = gpu_mib(server)


JOBS: dict[str, dict[str, Any]] = {
    "gptq": {"method": "gptq", "config": {"group_size": 128},
             "calibration": {"dataset": "tinyshakespeare", "samples": 32, "seq_len": 256}},
    "int4": {"method": "int4", "config": {"group_size": 64}},
}


def job_under_traffic(server: Server, ref: dict[str, Any], want: list[list[int]],
                      generate_tps: float, tokens: int, timeout_s: float, method: str) -> Row:
    """A GPU quantisation job while two clients keep requesting; the variant it
    swaps in is then measured like the others."""
    api = openai_client(server)
    model = api.models.list().data[0].id
    outcomes: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                api.completions.create(model=model, prompt=ref["prompts"][0], max_tokens=16,
                                       temperature=0.0)
                outcomes.append("ok")
            except Exception as exc:  # every failure is a finding, reported below
                outcomes.append(type(exc).__name__)

    clients = [threading.Thread(target=traffic) for _ in range(2)]
    for client in clients:
        client.start()
    row = Row(f"job: {method}")
    try:
        try:
            job = http(server.base + "/admin/quantize", JOBS[method])
        except urllib.error.HTTPError as exc:
            if method == "int4":
                raise
            # e.g. no calibration text on this machine
            row = Row("job: int4", notes=[f"{method} refused ({exc.code}): an int4 job instead"])
            job = http(server.base + "/admin/quantize", JOBS["int4"])
        status_url = job["status_url"]
        status_url = server.base + status_url if status_url.startswith("/") else status_url
        started = time.monotonic()
        status = http(status_url)
        while status["state"] not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"job still {status['state']} after {timeout_s:.0f} s")
            time.sleep(1)
            status = http(status_url)
        row.startup_s = time.monotonic() - started
        if status["state"] != "succeeded":
            row.ok = False
            row.notes.append(f"job {status['state']}: {status.get('error')}")
    except Exception as exc:  # reported in the job's row; the float row stands
        row.ok = False
        row.notes.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        stop.set()
        for client in clients:
            client.join()
    failed = [o for o in outcomes if o != "ok"]
    row.notes.append(f"{len(outcomes) - len(failed)}/{len(outcomes)} requests ok during the job")
    if failed or not outcomes:
        row.ok = False
        row.notes.append(f"failures: {sorted(set(failed))}")
    if row.ok:
        try:
            measure(row, server, ref, want, generate_tps, tokens)
        except Exception as exc:  # the swapped-in variant does not serve
            row.ok = False
            row.notes.append(f"after the swap: {type(exc).__name__}: {str(exc)[:200]}")
    return row


# ------------------------------------------------------------------- the table
def table(rows: list[Row], generate_tps: float) -> str:
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    head = ("variant", "ready/job s", "greedy agree", "decode tok/s", "vs generate",
            "8 streams tok/s", "CUDA graphs", "GPU MiB", "ok", "notes")
    lines = [head, *(
        (r.variant, num(r.startup_s), r.agree, num(r.decode_tps), num(r.vs_generate, 2),
         num(r.batch_tps), r.cuda_graphs, num(r.gpu_mib, 0), "yes" if r.ok else "NO",
         "; ".join(r.notes))
        for r in rows
    )]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
    out = [f"transformers generate (float bf16, one stream): {generate_tps:.1f} tok/s"]
    for line in lines:
        cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths, strict=True)]
        out.append(" | ".join([*cells, str(line[-1])]))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="float and/or quantisation methods, in order")
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per stream")
    parser.add_argument("--check-tokens", type=int, default=16,
                        help="greedy tokens compared with the float model")
    parser.add_argument("--compile", choices=("off", "on", "auto"), default="auto")
    parser.add_argument("--budget-s", type=float, default=570.0,
                        help="skip what would not finish within this many seconds")
    parser.add_argument("--job", choices=(*JOBS, "none"), default="gptq",
                        help="quantisation job run under traffic on the float server")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same steps on the CPU, to check this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "this check needs an NVIDIA GPU with a CUDA build of torch", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    print(machine(), flush=True)
    want, ref, generate_tps = reference(args.device, args.check_tokens, args.tokens)
    print(int8_kernels(args.device), flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="quantserve-gpu-check-") as tmp:
        workdir = Path(tmp)
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            row = Row(method)
            rows.append(row)
            if deadline - time.monotonic() < 60:
                row.notes.append("skipped: time budget spent")
                continue
            flags = ["--compile", args.compile]
            if method != "float":
                flags += ["--quantize", method]
            started = time.monotonic()
            try:
                with serve(flags, workdir, method, args.device) as server:
                    row.startup_s = time.monotonic() - started
                    measure(row, server, ref, want, generate_tps, args.tokens)
                    left = deadline - time.monotonic()
                    job = method == "float" and args.job != "none"
                    if job and left > 120:
                        rows.append(job_under_traffic(server, ref, want, generate_tps,
                                                      args.tokens, left - 60, args.job))
                    elif job:
                        rows.append(Row("job", notes=["skipped: time budget spent"]))
            except Exception as exc:  # one broken variant must not hide the others
                row.ok = False
                row.notes.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            print(f"{method}: done in {time.monotonic() - started:.0f} s", flush=True)
    print(table(rows, generate_tps))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

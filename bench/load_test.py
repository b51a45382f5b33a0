"""Load test: N concurrent streaming and non-streaming clients for a fixed time.

Loopback only and bounded: the target must be 127.0.0.1 / localhost, at most
256 clients for at most 10 minutes. Each client sends completions back to back
(every other client streams); a 429 is counted with whether it carried
Retry-After, and the client backs off briefly before its next request. A
watcher polls `/health` throughout. The server's resident memory is read from
/proc before the load (after a warm-up) and after it, so a per-request leak
shows up as growth that does not return to the baseline.

Start a server and load it (the embedded SmolLM2 unless --model is given):

    .venv/bin/python bench/load_test.py --clients 8 --duration 30 --max-queue 64
    .venv/bin/python bench/load_test.py --clients 32 --duration 30 --max-queue 2  # overload

or load a running loopback server whose pid you know:

    .venv/bin/python bench/load_test.py --base-url http://127.0.0.1:8000 --pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from quantizers.evaluation.machine import describe_machine

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_CLIENTS = 256
MAX_DURATION_S = 600.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Tally:
    """What the clients saw; latencies in seconds."""

    requests: int = 0
    ok: int = 0
    failures: int = 0
    overloaded: int = 0
    overloaded_with_retry_after: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    health_latencies: list[float] = field(default_factory=list)
    health_failures: int = 0

    def fail(self, kind: str) -> None:
        self.failures += 1
        self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def spawned_server(
    env_overrides: dict[str, str], log_dir: Path, ready_timeout_s: float = 300.0
) -> Iterator[tuple[str, int]]:
    """`quantserve serve` on a free loopback port; yields (base_url, pid)."""
    port = _free_port()
    env = {**os.environ, "QUANTSERVE_CACHE_DIR": str(log_dir / "cache"), **env_overrides}
    log_path = log_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout_s:.0f} s")
            time.sleep(0.5)
        yield base_url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _one_request(http: httpx.AsyncClient, body: dict[str, Any], tally: Tally) -> float:
    """Send one completion; returns how long to wait before the next one."""
    started = time.perf_counter()
    tally.requests += 1
    try:
        if body["stream"]:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                status, headers = response.status_code, response.headers
                done = errored = False
                if status == 200:
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith('data: {"error"'):
                            errored = True
                else:
                    await response.aread()
            if status == 200 and (not done or errored):
                tally.fail("stream_incomplete" if not done else "stream_error")
                return 0.0
        else:
            response = await http.post("/v1/completions", json=body)
            status, headers = response.status_code, response.headers
    except httpx.HTTPError as exc:
        tally.fail(type(exc).__name__)
        return 0.1
    if status == 200:
        tally.ok += 1
        tally.latencies.append(time.perf_counter() - started)
        return 0.0
    if status == 429:
        tally.overloaded += 1
        if headers.get("retry-after", "").isdigit():
            tally.overloaded_with_retry_after += 1
        return 0.05
    tally.fail(f"http_{status}")
    return 0.1


async def _client(http: httpx.AsyncClient, body: dict[str, Any], until: float,
                  tally: Tally) -> None:
    while time.monotonic() < until:
        pause = await _one_request(http, body, tally)
        if pause:
            await asyncio.sleep(pause)


async def _watch_health(base_url: str, until: float, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                response = await http.get("/health")
                if response.status_code == 200:
                    tally.health_latencies.append(time.perf_counter() - started)
                else:
                    tally.health_failures += 1
            except httpx.HTTPError:
                tally.health_failures += 1
            await asyncio.sleep(0.2)


async def run_load(base_url: str, *, clients: int, duration_s: float, model: str,
                   max_tokens: int, api_key: str | None) -> Tally:
    tally = Tally()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    until = time.monotonic() + duration_s
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(120.0)) as http:
        tasks = [
            _client(http, {"model": model, "prompt": f"Load test client {i} says",
                           "max_tokens": max_tokens, "temperature": 0.7, "stream": i % 2 == 1},
                    until, tally)
            for i in range(clients)
        ]
        await asyncio.gather(_watch_health(base_url, until, tally), *tasks)
    return tally


def _served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def _settled_rss(pid: int) -> int:
    """RSS after the allocator has had a moment to return freed pages."""
    time.sleep(1.0)
    return rss_bytes(pid)


def measure(base_url: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    model = _served_model(base_url, args.api_key)
    load = {"clients": min(args.clients, 4), "duration_s": min(args.duration, 3.0),
            "model": model, "max_tokens": args.max_tokens, "api_key": args.api_key}
    asyncio.run(run_load(base_url, **load))  # warm-up: allocator pools, first-batch shapes
    rss_before = _settled_rss(pid) if pid else None
    started = time.monotonic()
    tally = asyncio.run(run_load(base_url, clients=args.clients, duration_s=args.duration,
                                 model=model, max_tokens=args.max_tokens,
                                 api_key=args.api_key))
    elapsed = time.monotonic() - started
    rss_after = _settled_rss(pid) if pid else None
    summary = asdict(tally)
    latencies, health = summary.pop("latencies"), summary.pop("health_latencies")
    summary.update(
        clients=args.clients, duration_s=round(elapsed, 1), max_tokens=args.max_tokens,
        requests_per_s=round(tally.requests / elapsed, 2),
        p50_s=quantile(latencies, 0.50), p95_s=quantile(latencies, 0.95),
        health_checks=len(health), health_p50_s=quantile(health, 0.50),
        health_p95_s=quantile(health, 0.95), health_max_s=max(health, default=None),
        rss_before_bytes=rss_before, rss_after_bytes=rss_after,
        rss_growth_per_request_bytes=(round((rss_after - rss_before) / max(1, tally.ok))
                                      if rss_before and rss_after else None),
    )
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--base-url", help="a running loopback server (default: start one)")
    parser.add_argument("--pid", type=int, help="its pid, to read its memory")
    parser.add_argument("--api-key", default=os.environ.get("QUANTSERVE_API_KEY"))
    parser.add_argument("--model", help="model of the started server (default: embedded)")
    parser.add_argument("--model-id", help="id of the started server's model")
    parser.add_argument("--max-queue", type=int, default=64, help="of the started server")
    parser.add_argument("--max-batch", type=int, default=8, help="of the started server")
    parser.add_argument("--dtype", default="bfloat16", help="of the started server")
    parser.add_argument("--num-threads", type=int, help="torch threads of the started server "
                        "(on a shared box, fewer threads than cores avoids oversubscription)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in [1, {MAX_CLIENTS}]")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:.0f}]")
    if args.base_url and urlparse(args.base_url).hostname not in LOOPBACK:
        parser.error("--base-url must be a loopback address: this tool never loads a remote host")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.base_url:
        summary = measure(args.base_url.rstrip("/"), args.pid, args)
    else:
        env = {"QUANTSERVE_MAX_QUEUE": str(args.max_queue),
               "QUANTSERVE_MAX_NUM_SEQS": str(args.max_batch), "QUANTSERVE_DTYPE": args.dtype}
        if args.model:
            env["QUANTSERVE_MODEL"] = args.model
        if args.model_id:
            env["QUANTSERVE_MODEL_ID"] = args.model_id
        if args.num_threads:
            env["QUANTSERVE_NUM_THREADS"] = str(args.num_threads)
        with tempfile.TemporaryDirectory() as tmp, spawned_server(env, Path(tmp)) as (url, pid):
            summary = measure(url, pid, args)
        summary.update(max_queue=args.max_queue, max_batch=args.max_batch)
    summary["machine"] = describe_machine(args.num_threads)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

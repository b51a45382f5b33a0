"""Decode speed of a live server before and after a `/admin/quantize` job.

A regression check for the engine sharing the process with quantisation: the
job's compute must not leave anything behind that slows the serving engine
(an idle OpenMP pool on a long-lived job thread once cut decode speed to
0.63x). The server run is the one of the checkout this file lives in, so a
copy placed in an older checkout measures that version.
Starts `quantserve serve --quantize int8` on loopback with a temporary cache,
times single-client greedy streams, runs a job to another int8 variant,
and times them again on the model the job swapped in.

    .venv/bin/python bench/decode_after_job.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

from quantizers.evaluation.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, data: dict | None = None) -> dict:
    request = urllib.request.Request(
        url, data=None if data is None else json.dumps(data).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="GET" if data is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_ready(base: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            urllib.request.urlopen(base + "/ready", timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("server not ready in time")


def decode_speed(api: OpenAI, model: str, tokens: int, reps: int) -> float:
    """Best of `reps` single-stream decode rates (tokens after the first / time)."""
    best = 0.0
    for _ in range(reps):
        first, count = None, 0
        stream = api.completions.create(
            model=model, prompt="Write a long story about the sea.\n\n",
            max_tokens=tokens, temperature=0.0, stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                count += 1
                first = first or time.perf_counter()
        if first is not None and count > 1:
            best = max(best, (count - 1) / (time.perf_counter() - first))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"Machine: {describe_machine(args.threads or None)}", flush=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "QUANTSERVE_ADMIN_TOKEN": TOKEN, "QUANTSERVE_CACHE_DIR": cache,
               "QUANTSERVE_NUM_THREADS": str(args.threads)}
        # The server of the checkout this script lives in (run from a copy in
        # an older checkout, it measures that version).
        server = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
             "--quantize", "int8"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(base, server)
            api = OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0)
            model = api.models.list().data[0].id
            before = decode_speed(api, model, args.tokens, args.reps)
            # int8 with the first MLP left in float: a different artifact, so a real job.
            job = get_json(base + "/admin/quantize", {
                "method": "int8", "config": {"overrides": {"*layers.0.mlp*": None}},
            })
            status_url = base + job["status_url"] if job["status_url"].startswith("/") \
                else job["status_url"]
            while (state := get_json(status_url)["state"]) not in (
                "succeeded", "failed", "cancelled"
            ):
                time.sleep(1)
            after = decode_speed(api, model, args.tokens, args.reps)
        finally:
            server.terminate()
            server.wait(30)
    print(f"job {state}; single-client decode, {args.threads} threads, best of {args.reps}: "
          f"{before:.1f} tok/s before the job, {after:.1f} after ({after / before:.2f}x)")
    if state != "succeeded":
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Start-up time of the real server: float model, cold quantisation, artifact-cache hit.

For each method the server is started twice on one fresh cache directory: the
first start quantises (cold) and stores the artifact, the second finds it
(hit). A float start-up in the same run is the baseline, since timings on a
shared machine are only comparable within one run. Time is measured from
process launch to the first 200 from /ready, i.e. what an orchestrator sees.

    .venv/bin/python bench/startup_cache.py --methods int8 int4 gptq
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from quantizers.evaluation.machine import describe_machine

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin-token"
CONFIGS: dict[str, dict[str, Any]] = {
    "int8": {},
    "int4": {"group_size": 128},
    "gptq": {"group_size": 128, "calibration": {"dataset": "tinyshakespeare", "samples": 16,
                                                "seq_len": 256}},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed_start(cache: Path, method: str | None, log: Path) -> dict[str, Any]:
    """Launch a server, wait for /ready, read its start-up job, stop it."""
    port = free_port()
    env = {**os.environ, "QUANTSERVE_CACHE_DIR": str(cache), "QUANTSERVE_ADMIN_TOKEN": TOKEN,
           "QUANTSERVE_QUANTIZE": method or "",
           "QUANTSERVE_QUANTIZE_CONFIG": json.dumps(CONFIGS.get(method, {}))}
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: see {log}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        ready_s = time.perf_counter() - started
        jobs = httpx.get(f"{base}/admin/jobs", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=10).json()["data"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    job = next((j for j in jobs if j["origin"] == "startup"), None)
    return {"ready_s": round(ready_s, 2), "cache_hit": job["cache_hit"] if job else None,
            "phases": job["timings"] if job else {}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["int8", "int4"], choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    print(f"Machine: {describe_machine(None)}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="quantserve-bench-") as tmp:
        root = Path(tmp)
        results["float"] = timed_start(root / "float-cache", None, root / "float.log")
        print(f"float: {results['float']}", flush=True)
        for method in args.methods:
            cache = root / f"{method}-cache"
            for case in ("cold", "hit"):
                result = timed_start(cache, method, root / f"{method}-{case}.log")
                results[f"{method} {case}"] = result
                print(f"{method} {case}: {result}", flush=True)
    base = results["float"]["ready_s"]
    print("\n| start-up | ready (s) | vs float | cache hit | phases (s) |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        phases = ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in result["phases"].items()
                           if k not in ("queued_s", "total_s"))
        print(f"| {name} | {result['ready_s']} | {result['ready_s'] / base:.2f}x | "
              f"{result['cache_hit']} | {phases} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the admin API tests: a tiny model served for real, and polling."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

ADMIN_TOKEN = "admin-secret-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FINISHED = {"succeeded", "failed", "cancelled"}


def tiny_env(model_dir: Path, **extra: str) -> dict[str, str]:
    return {"QUANTSERVE_MODEL": str(model_dir), "QUANTSERVE_MODEL_ID": "tiny",
            "QUANTSERVE_ADMIN_TOKEN": ADMIN_TOKEN, **extra}


def wait_job(client: httpx.Client, status_url: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(status_url, headers=AUTH).json()
        if job["state"] in FINISHED:
            return job
        assert time.monotonic() < deadline, f"job not finished: {job}"
        time.sleep(0.05)


def startup_job(client: httpx.Client) -> dict[str, Any]:
    jobs = client.get("/admin/jobs", headers=AUTH).json()["data"]
    return next(job for job in jobs if job["origin"] == "startup")

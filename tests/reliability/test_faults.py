"""Faults injected into a live server: a quantisation job that raises midway,
a full cache disk, a corrupted artifact, a client that leaves mid-stream, a
generation past its time limit. In every case the server keeps serving the
model it had, says what happened (job error, HTTP error, metric) and leaves
no half-written artifact behind."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.server_process import ServerProcess
from tests.reliability.conftest import OPEN_REQUEST_TIMEOUT_S
from tests.reliability.faulty_server import FAULT_MESSAGE, FAULT_METHOD
from tests.reliability.metrics_reading import metric_value
from tests.reliability.serving import ADMIN_AUTH, ADMIN_TOKEN, MODEL_ID, server_process, tiny_env

pytestmark = pytest.mark.slow  # real server processes (tiny model)

TMPFS_BYTES = 1 << 20
FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def cache_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bool]]:
    """The cache directory, on a 1 MiB tmpfs when this process may mount one."""
    cache = tmp_path_factory.mktemp("faults") / "cache"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                              str(cache)], capture_output=True).returncode == 0
    yield cache, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(cache)], check=False)


@pytest.fixture(scope="module")
def faulty(tiny_model: Path, cache_volume: tuple[Path, bool]) -> Iterator[ServerProcess]:
    cache, _ = cache_volume
    env = tiny_env(tiny_model, cache, QUANTSERVE_ADMIN_TOKEN=ADMIN_TOKEN)
    with server_process(cache.parent, env, faulty=True) as server:
        yield server


@pytest.fixture
def http(faulty: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=faulty.base_url, timeout=60) as client:
        yield client


def run_job(http: httpx.Client, request: dict[str, Any]) -> dict[str, Any]:
    accepted = http.post("/admin/quantize", json=request, headers=ADMIN_AUTH)
    assert accepted.status_code in (200, 202), accepted.text
    if accepted.status_code == 200:
        return {"state": "succeeded", "artifact_key": accepted.json()["artifact"]["key"]}
    deadline = time.monotonic() + 120
    while (job := http.get(accepted.json()["status_url"], headers=ADMIN_AUTH).json())[
            "state"] not in FINISHED:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def served_variant(http: httpx.Client) -> str:
    """The variant that actually generates (not just what /v1/models says)."""
    out = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "ok",
                                             "max_tokens": 2})
    assert out.status_code == 200, out.text
    return out.json()["system_fingerprint"]


def assert_no_half_artifact(cache: Path, key: str) -> None:
    assert list((cache / "tmp").iterdir()) == [], "no write left in progress"
    assert not (cache / "objects" / key).exists()


def test_job_that_raises_midway_fails_cleanly(
    http: httpx.Client, faulty: ServerProcess, cache_volume: tuple[Path, bool]
) -> None:
    before = served_variant(http)
    job = run_job(http, {"method": FAULT_METHOD, "config": {"fail_after": 3}})
    assert job["state"] == "failed"
    assert job["error"]["type"] == "LayerQuantizationError"
    assert FAULT_MESSAGE in job["error"]["message"]
    assert job["error"]["layer"], "the failing layer is named"
    assert job["progress"]["layers_done"] == 3, "it failed midway, after real work"
    assert served_variant(http) == before
    assert_no_half_artifact(cache_volume[0], job["artifact_key"])
    assert f"job {job['id']} failed" in faulty.log()


def test_full_cache_disk_fails_the_job_and_recovers(
    http: httpx.Client, cache_volume: tuple[Path, bool]
) -> None:
    cache, mounted = cache_volume
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    assert http.post("/admin/activate", json={"artifact": "base"},
                     headers=ADMIN_AUTH).status_code == 200
    assert served_variant(http) == "float"
    filler = cache / "filler"
    with filler.open("wb") as out:  # leave ~8 KiB: less than any artifact
        free = os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize
        out.write(b"\0" * max(0, free - 8192))
    try:
        job = run_job(http, {"method": "int8"})
        assert job["state"] == "failed"
        assert job["error"]["type"] == "artifact_write_error"
        assert job["error"]["disk_full"] is True
        assert served_variant(http) == "float"
        assert_no_half_artifact(cache, job["artifact_key"])
    finally:
        filler.unlink()
    retry = run_job(http, {"method": "int8"})
    assert retry["state"] == "succeeded", retry
    assert served_variant(http) == "int8"


def test_corrupted_artifact_is_quarantined_not_served(
    http: httpx.Client, cache_volume: tuple[Path, bool]
) -> None:
    cache = cache_volume[0]
    key = run_job(http, {"method": "int4", "config": {"group_size": 32}})["artifact_key"]
    assert http.post("/admin/activate", json={"artifact": "base"},
                     headers=ADMIN_AUTH).status_code == 200
    assert served_variant(http) == "float"
    corrupt_before = metric_value(http, "quantserve_artifact_cache_corrupt_total")
    payload = next((cache / "objects" / key).glob("*.safetensors"))
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))

    refused = http.post("/admin/activate", json={"artifact": key}, headers=ADMIN_AUTH)
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "artifact_not_found"
    assert served_variant(http) == "float"
    assert not (cache / "objects" / key).exists()
    assert [p.name.rsplit("-", 1)[0] for p in (cache / "quarantine").iterdir()] == [key]
    assert metric_value(http, "quantserve_artifact_cache_corrupt_total") == corrupt_before + 1


def test_client_leaving_mid_stream_frees_its_slot(http: httpx.Client) -> None:
    left_before = metric_value(http, "quantserve_client_disconnects_total")
    body = {"model": MODEL_ID, "prompt": "a long story", "max_tokens": 480, "stream": True,
            "n": 8}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while metric_value(http, "quantserve_client_disconnects_total") < left_before + 1:
        assert time.monotonic() < deadline, "the disconnect was noticed and counted"
        time.sleep(0.05)
    assert metric_value(http, "quantserve_requests_running") == 0, "the sequence was cancelled"
    assert served_variant(http)


def test_generation_past_its_time_limit_ends_as_length(open_server: ServerProcess) -> None:
    body = {"model": MODEL_ID, "prompt": "go", "max_tokens": 480, "temperature": 0}
    with httpx.Client(base_url=open_server.base_url, timeout=60) as http:
        before = metric_value(http, "quantserve_choices_finished_total", finish_reason="timeout")
        started = time.monotonic()
        out = http.post("/v1/completions", json=body)
        took = time.monotonic() - started
        assert out.status_code == 200, out.text
        assert out.json()["choices"][0]["finish_reason"] == "length"
        assert out.json()["usage"]["completion_tokens"] < 480
        assert took < 480 * OPEN_REQUEST_TIMEOUT_S, "cut at the limit, not run to the end"
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in events[-2]
        after = metric_value(http, "quantserve_choices_finished_total", finish_reason="timeout")
        assert after == before + 2
        assert http.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200

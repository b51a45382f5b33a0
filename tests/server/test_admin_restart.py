"""Restarts on the same cache dir: hit without re-quantising, corruption rebuilt,
and a server killed mid-quantisation leaves nothing half-built behind."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.server_process import running_server
from tests.helpers.tiny_model_dir import write_tiny_model
from tests.server.admin_helpers import AUTH, startup_job, tiny_env

pytestmark = pytest.mark.slow


def cache_state(client: httpx.Client) -> dict:
    return client.get("/admin/artifacts", headers=AUTH).json()


def test_restart_loads_the_artifact_and_a_corrupt_one_is_rebuilt(tmp_path: Path) -> None:
    env = tiny_env(write_tiny_model(tmp_path / "model"), QUANTSERVE_QUANTIZE="int4",
                   QUANTSERVE_QUANTIZE_CONFIG='{"group_size": 32}')
    with running_server(tmp_path, env=env) as first, httpx.Client(base_url=first.base_url) as c:
        cold = startup_job(c)
        assert cold["state"] == "succeeded" and not cold["cache_hit"]
        assert "quantize_s" in cold["timings"]
        assert c.get("/v1/models").json()["data"][0]["quantization"]["group_size"] == 32
    key = cold["artifact_key"]

    with running_server(tmp_path, env=env) as second, httpx.Client(base_url=second.base_url) as c:
        warm = startup_job(c)
        assert warm["cache_hit"] and warm["artifact_key"] == key
        assert "quantize_s" not in warm["timings"], "loaded, not rebuilt"
        assert cache_state(c)["counters"] == {"hits": 1, "misses": 0, "evictions": 0,
                                              "corrupt": 0}
        assert c.get("/v1/models").json()["data"][0]["variant"] == "int4"
    assert "loaded from the artifact cache" in second.log()

    payload = next((tmp_path / "cache" / "objects" / key).glob("*.safetensors"))
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))

    with running_server(tmp_path, env=env) as third, httpx.Client(base_url=third.base_url) as c:
        rebuilt = startup_job(c)
        assert not rebuilt["cache_hit"] and rebuilt["artifact_key"] == key
        state = cache_state(c)
        assert state["counters"]["corrupt"] == 1 and state["counters"]["misses"] == 1
        assert [item["key"] for item in state["data"]] == [key]
        completion = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                     "max_tokens": 4})
        assert completion.json()["system_fingerprint"] == "int4"
    assert "corrupt artifact" in third.log()
    quarantined = list((tmp_path / "cache" / "quarantine").iterdir())
    assert [path.name.rsplit("-", 1)[0] for path in quarantined] == [key]


def test_server_killed_mid_quantisation_leaves_no_half_artifact(tmp_path: Path) -> None:
    env = tiny_env(write_tiny_model(tmp_path / "model"))
    request = {"method": "int8"}
    with running_server(tmp_path, env=env) as server, httpx.Client(
        base_url=server.base_url, timeout=30
    ) as client:
        accepted = client.post("/admin/quantize", json=request, headers=AUTH).json()
        deadline = time.monotonic() + 60
        while (job := client.get(accepted["status_url"], headers=AUTH).json())["progress"][
            "phase"
        ] not in ("quantize", "evaluate"):
            assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.005)
        server.process.kill()
        server.process.wait()
    key = accepted["artifact_key"]
    assert not (tmp_path / "cache" / "objects" / key).exists()

    with running_server(tmp_path, env=env) as again, httpx.Client(
        base_url=again.base_url, timeout=30
    ) as client:
        assert list((tmp_path / "cache" / "tmp").iterdir()) == []
        assert cache_state(client)["data"] == []
        retry = client.post("/admin/quantize", json=request, headers=AUTH)
        assert retry.status_code == 202, "nothing cached: the variant is built again"
        assert client.get("/v1/models").json()["data"][0]["variant"] == "float"

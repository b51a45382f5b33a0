"""The admin API against a real server on loopback (a tiny Llama, for speed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.server_process import ServerProcess, running_server
from tests.helpers.tiny_model_dir import write_tiny_model
from tests.server.admin_helpers import ADMIN_TOKEN, AUTH, tiny_env, wait_job

pytestmark = pytest.mark.slow

# Bodies that pass authentication but change nothing (an invalid config, the
# model already served), so the auth checks never start a job.
ADMIN_ROUTES = [
    ("POST", "/admin/quantize", {"method": "int8", "config": {"bogus": 1}}),
    ("GET", "/admin/jobs", None),
    ("GET", "/admin/jobs/qjob-x", None),
    ("DELETE", "/admin/jobs/qjob-x", None),
    ("GET", "/admin/artifacts", None),
    ("DELETE", "/admin/artifacts/" + "0" * 64, None),
    ("POST", "/admin/activate", {"artifact": "base"}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/adapter"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("admin")
    model = write_tiny_model(tmp / "model")
    with running_server(tmp, env=tiny_env(model)) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield http


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_every_admin_route_needs_the_token(
    client: httpx.Client, method: str, path: str, body: dict | None
) -> None:
    for headers, status in [
        ({}, 401),
        ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
        ({"Authorization": "Bearer wrong-token"}, 403),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 403),
    ]:
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code == status, (headers, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert ADMIN_TOKEN not in response.text
    assert client.request(method, path, json=body, headers=AUTH).status_code not in (401, 403)


@pytest.mark.parametrize(("body", "param"), [
    ({"method": "no-such-method"}, "method"),
    ({"method": "int4", "config": {"group_size": 100}}, "config.group_size"),
    ({"method": "int4", "config": {"bogus": 1}}, "config.bogus"),
    ('{"method": "gptq", "config": {"damp": NaN}}', "config.damp"),
    ({"method": "int8", "calibration": {"dataset": "../etc/passwd"}}, "calibration.dataset"),
    ({"method": "int8", "calibration": {"samples": 0}}, "calibration.samples"),
    ({"method": "int8", "extra": True}, "extra"),
    ({"config": {}}, "method"),
    ({"method": "qat", "config": {"start": "awq"}}, "config.start"),
    ({"method": "qat", "config": {"block_steps": -1}}, "config.block_steps"),
    ({"method": "qat", "config": {"start": "mixed"}}, "config.start_config"),
])
def test_bad_method_or_config_is_422_naming_the_field(
    client: httpx.Client, body: dict | str, param: str
) -> None:
    if isinstance(body, str):
        response = client.post("/admin/quantize", content=body,
                               headers={**AUTH, "Content-Type": "application/json"})
    else:
        response = client.post("/admin/quantize", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_ids_are_404(client: httpx.Client) -> None:
    assert client.get("/admin/jobs/qjob-nope", headers=AUTH).status_code == 404
    assert client.delete("/admin/artifacts/" + "a" * 64, headers=AUTH).status_code == 404
    assert client.delete("/admin/artifacts/..", headers=AUTH).status_code == 404
    response = client.post("/admin/activate", json={"artifact": "b" * 64}, headers=AUTH)
    assert response.status_code == 404
    response = client.post("/admin/activate", json={"artifact": "../x"}, headers=AUTH)
    assert response.status_code == 422 and response.json()["error"]["param"] == "artifact"


class Traffic:
    """Clients looping on /v1 while a job runs: one streaming chat, one plain
    completion. Records every failure and, per request, the variant that served it."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.variants: dict[str, list[str]] = {"stream": [], "plain": []}
        self.threads = [threading.Thread(target=self._stream), threading.Thread(target=self._plain)]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def wait_for(self, variant: str, timeout: float = 60.0) -> None:
        """Keep the clients running until each has been served by `variant`."""
        deadline = time.monotonic() + timeout
        while not all(variant in seen for seen in self.variants.values()):
            if time.monotonic() > deadline or self.failures:
                return
            time.sleep(0.05)

    def _stream(self) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 8, "stream": True}
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    with http.stream("POST", "/v1/chat/completions", json=body) as response:
                        lines = [line for line in response.iter_lines() if line]
                    if response.status_code != 200 or lines[-1] != "data: [DONE]":
                        self.failures.append(f"stream {response.status_code}: {lines[-1:]}")
                        continue
                    fingerprint = httpx.Response(200, content=lines[0][6:]).json()
                    self.variants["stream"].append(fingerprint["system_fingerprint"])
                except httpx.HTTPError as exc:
                    self.failures.append(f"stream: {exc!r}")

    def _plain(self) -> None:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 8}
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    response = http.post("/v1/completions", json=body)
                    if response.status_code != 200:
                        self.failures.append(f"plain {response.status_code}: {response.text}")
                        continue
                    self.variants["plain"].append(response.json()["system_fingerprint"])
                except httpx.HTTPError as exc:
                    self.failures.append(f"plain: {exc!r}")


def test_quantise_while_serving_swaps_without_errors(
    server: ServerProcess, client: httpx.Client
) -> None:
    with Traffic(server.base_url) as traffic:
        time.sleep(1.0)
        response = client.post("/admin/quantize", json={"method": "int8"}, headers=AUTH)
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert response.headers["location"] == accepted["status_url"]
        job = wait_job(client, accepted["status_url"])
        traffic.wait_for("int8")
    assert job["state"] == "succeeded", job["error"]
    # 2 decoder layers x 7 linears, plus the tied lm_head the default int8 quantises
    assert job["progress"]["percent"] == 100.0 and job["progress"]["layers_total"] == 15
    assert job["quality"]["top1"] > 0.5 and job["quality"]["kl"] >= 0
    assert job["quality"]["weight_bytes"] < job["quality"]["base_weight_bytes"]
    assert traffic.failures == []
    for name, seen in traffic.variants.items():
        assert seen, f"the {name} client completed no request"
        swapped_at = seen.index("int8") if "int8" in seen else len(seen)
        assert set(seen[:swapped_at]) <= {"float"} and set(seen[swapped_at:]) == {"int8"}, seen
    assert all("int8" in seen for seen in traffic.variants.values()), (
        "requests after the swap use the new variant")
    card = client.get("/v1/models").json()["data"][0]
    assert card["variant"] == "int8" and card["quantization"]["method"] == "int8"
    assert card["quality"] == job["quality"]


def test_cached_variant_answers_200_and_activation_round_trip(client: httpx.Client) -> None:
    job = wait_job(client, client.post("/admin/quantize", json={"method": "int4", "config": {
        "group_size": 32}}, headers=AUTH).json()["status_url"])
    assert job["state"] == "succeeded", job["error"]
    key = job["artifact_key"]

    assert client.post("/admin/activate", json={"artifact": "base"}, headers=AUTH).json()[
        "variant"] == "float"
    assert client.get("/v1/models").json()["data"][0]["variant"] == "float"

    again = client.post("/admin/quantize", json={"method": "int4", "config": {"group_size": 32}},
                        headers=AUTH)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "cached" and again.json()["artifact"]["key"] == key
    assert again.json()["served"]["quantization"] == {"method": "int4", "group_size": 32,
                                                      "pad": True}
    card = client.get("/v1/models").json()["data"][0]
    assert card["quantization"]["group_size"] == 32

    listing = client.get("/admin/artifacts", headers=AUTH).json()
    entry = next(item for item in listing["data"] if item["key"] == key)
    assert entry["active"] and entry["method"] == "int4" and entry["bytes"] > 0
    assert entry["quality"] == job["quality"] and entry["last_used"] >= entry["created"]
    assert listing["counters"]["hits"] >= 1
    deleted = client.delete(f"/admin/artifacts/{key}", headers=AUTH)
    assert deleted.status_code == 409, "the served artifact cannot be deleted"

    client.post("/admin/activate", json={"artifact": "base"}, headers=AUTH)
    assert client.delete(f"/admin/artifacts/{key}", headers=AUTH).json() == {
        "key": key, "deleted": True}
    assert key not in {item["key"] for item in
                       client.get("/admin/artifacts", headers=AUTH).json()["data"]}


def test_qat_trains_through_the_api_and_serves_the_result(client: httpx.Client) -> None:
    config = {"group_size": 32, "data": "generated", "samples": 4, "seq_len": 32, "batch": 2,
              "block_steps": 3, "e2e_steps": 2}
    accepted = client.post("/admin/quantize", json={"method": "qat", "config": config},
                           headers=AUTH)
    assert accepted.status_code == 202, accepted.text
    job = wait_job(client, accepted.json()["status_url"])
    assert job["state"] == "succeeded", job["error"]
    detail = job["progress"]["detail"]
    assert detail["phase"] == "end_to_end" and detail["step"] == detail["steps"] == 2 * 3 + 2
    assert detail["loss"] >= 0 and detail["eta_s"] == 0
    assert job["quality"]["weight_bytes"] < job["quality"]["base_weight_bytes"]
    card = client.get("/v1/models").json()["data"][0]
    assert card["quantization"]["method"] == "qat" and card["quantization"]["seed"] == 0
    completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello",
                                                      "max_tokens": 4})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] >= 1


def test_cancel_a_job_through_the_api(client: httpx.Client) -> None:
    before = client.get("/v1/models").json()["data"][0]["variant"]
    accepted = client.post("/admin/quantize", json={"method": "int4", "config": {
        "group_size": 64}}, headers=AUTH).json()
    cancelled = client.delete(accepted["status_url"], headers=AUTH)
    assert cancelled.status_code == 200
    job = wait_job(client, accepted["status_url"])
    assert job["state"] == "cancelled"
    assert client.delete(accepted["status_url"], headers=AUTH).status_code == 409
    assert client.get("/v1/models").json()["data"][0]["variant"] == before

"""LoRA adapters over real HTTP: vLLM's load/unload routes, /v1/models, and requests
that name an adapter, against a real server on a tiny Llama (openai client + httpx)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers.lora_adapters import save_random_adapter
from tests.helpers.server_process import ServerProcess, running_server
from tests.helpers.tiny_model_dir import write_tiny_model
from tests.server.admin_helpers import AUTH, tiny_env

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random peft adapters for the tiny model (a, b, c), and one for a wider model."""
    tmp = tmp_path_factory.mktemp("adapters")
    model = LlamaForCausalLM.from_pretrained(write_tiny_model(tmp / "model"))
    for seed, name in enumerate("abc", start=1):
        save_random_adapter(model, tmp / name, seed=seed, alpha=32.0)
    config = model.config.to_dict() | {"hidden_size": 32, "intermediate_size": 64}
    wide = LlamaForCausalLM(LlamaConfig(**config))
    save_random_adapter(wide, tmp / "other-shape", seed=4)
    (tmp / "empty").mkdir()
    return tmp


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapters: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("lora-server")
    model = write_tiny_model(tmp / "model")
    with running_server(tmp, env=tiny_env(model, QUANTSERVE_MAX_LORAS="2")) as process:
        yield process


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def _load(http: httpx.Client, name: str, path: Path, **headers: str) -> httpx.Response:
    return http.post(
        "/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path)},
        headers=headers or AUTH,
    )


def _unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH)


def _complete(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.model == model
    return out.choices[0].text


def test_an_adapter_is_a_model_while_loaded(
    http: httpx.Client, client: openai.OpenAI, adapters: Path, server: ServerProcess
) -> None:
    base = _complete(client, "tiny")
    loaded = _load(http, "a", adapters / "a")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"object": "lora_adapter", "id": "a", "parent": "tiny", "evicted": []}
    cards = {m.id: m for m in client.models.list().data}
    assert cards["a"].parent == "tiny" and cards["a"].root == str(adapters / "a")
    assert cards["a"].lora["rank"] == 4 and "q_proj" in cards["a"].lora["target_modules"]
    assert getattr(cards["tiny"], "parent", None) is None
    tuned = _complete(client, "a")
    assert tuned != base
    chat = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert chat.model == "a"
    assert '"model":"tiny","adapter":"a"' in server.log()  # the request's log line
    metrics = http.get("/metrics").text
    assert 'quantserve_lora_choices_total{adapter="a",model="tiny"' in metrics
    assert _unload(http, "a").status_code == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _complete(client, "a")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert _complete(client, "tiny") == base


def test_bad_loads_are_4xx_that_say_why(http: httpx.Client, adapters: Path) -> None:
    assert _load(http, "x", adapters / "a", Authorization="Bearer wrong").status_code == 403
    assert http.post("/v1/load_lora_adapter", json={}).status_code == 401
    cases = [
        ("x", adapters / "missing", 400, "is not a directory"),
        ("x", adapters / "empty", 400, "has no adapter_config.json"),
        ("x", adapters / "other-shape", 400, "does not fit the served model"),
        ("tiny", adapters / "a", 400, "base model's name"),
    ]
    for name, path, status, message in cases:
        response = _load(http, name, path)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
    assert _load(http, "b", adapters / "b").status_code == 200
    duplicate = _load(http, "b", adapters / "b")
    assert duplicate.status_code == 400 and "already loaded" in duplicate.text
    missing = _unload(http, "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    assert _unload(http, "b").status_code == 200


def test_max_loras_unloads_the_least_recently_used(
    http: httpx.Client, client: openai.OpenAI, adapters: Path
) -> None:
    for name in "abc":
        assert _load(http, name, adapters / name).status_code == 200
        if name == "b":
            _complete(client, "a")  # a is used after b was loaded: b is now the oldest
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "a", "c"]
    for name in ("a", "c"):
        assert _unload(http, name).status_code == 200


def _wait(http: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/admin/adapters/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_train_an_adapter_while_serving(
    http: httpx.Client, client: openai.OpenAI, tmp_path: Path
) -> None:
    text = tmp_path / "pattern.txt"
    text.write_text("abcabd " * 400)
    body = {
        "name": "pattern",
        "dataset": str(text),
        "rank": 4,
        "alpha": 8,
        "steps": 30,
        "learning_rate": 0.05,
        # The tiny random model's head is too small to peak its logits: adapt it too.
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"],
        "seq_len": 32,
        "batch_size": 2,
    }
    started = http.post("/admin/adapters", json=body, headers=AUTH)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    assert _complete(client, "tiny")  # the base keeps serving meanwhile
    job = _wait(http, job_id)
    assert job["state"] == "succeeded", job
    assert job["step"] == 30 and len(job["losses"]) == 30
    assert sum(job["losses"][-5:]) < 0.7 * sum(job["losses"][:5])
    cards = {m.id: m for m in client.models.list().data}
    assert cards["pattern"].parent == "tiny" and job["key"] in cards["pattern"].root
    tuned = client.completions.create(
        model="pattern", prompt="abcabd abc", max_tokens=8, temperature=0
    )
    assert set(tuned.choices[0].text) <= set("abcd ")  # it writes the text's letters
    assert _unload(http, "pattern").status_code == 200
    again = http.post("/admin/adapters", json=body, headers=AUTH)  # same base, text, config
    assert again.status_code == 200 and again.json()["cache_hit"], again.text
    assert _unload(http, "pattern").status_code == 200


def test_cancel_training_and_bad_requests(http: httpx.Client, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 300)
    body = {"name": "long", "dataset": str(text), "steps": 100000, "seq_len": 16}
    job_id = http.post("/admin/adapters", json=body, headers=AUTH).json()["id"]
    while http.get(f"/admin/adapters/jobs/{job_id}", headers=AUTH).json()["step"] < 1:
        time.sleep(0.05)
    assert http.delete(f"/admin/adapters/jobs/{job_id}", headers=AUTH).status_code == 200
    assert _wait(http, job_id)["state"] == "cancelled"
    assert "long" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    for bad, param in [
        ({"rank": 0}, "rank"),
        ({"dataset": str(tmp_path / "missing.txt")}, "dataset"),
        ({"target_modules": ["c_attn"]}, "target_modules"),
        ({"name": "tiny"}, "name"),
        ({"batch_size": 64, "seq_len": 4096}, "batch_size"),  # over the memory bound
    ]:
        response = http.post("/admin/adapters", json={**body, **bad}, headers=AUTH)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["param"] == param
    assert http.post("/admin/adapters", json=body).status_code == 401

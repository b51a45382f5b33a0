"""LoRA adapters over real HTTP: vLLM's load/unload routes, /v1/models, and requests
that name an adapter, against a real server on a tiny Llama (openai client + httpx)."""

from __future__ import annotations

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

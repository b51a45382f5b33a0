"""Round trip over real HTTP: a quantised variant served, downloaded from
GET /admin/artifacts/{key}/export, served again from the export on our kernels
(`--model`), gives the same greedy output; and the route's errors."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.server_process import ServerProcess, running_server
from tests.helpers.tiny_model_dir import write_tiny_model
from tests.server.admin_helpers import AUTH, tiny_env

pytestmark = pytest.mark.slow

PROMPT = "Hello, w"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """The tiny model served as int4 g32 (built at start-up into the cache)."""
    tmp = tmp_path_factory.mktemp("export-serving")
    model = write_tiny_model(tmp / "model")
    env = tiny_env(model, QUANTSERVE_QUANTIZE="int4",
                   QUANTSERVE_QUANTIZE_CONFIG=json.dumps({"group_size": 32}))
    with running_server(tmp, env=env) as process:
        yield process, tmp


def greedy(server: ServerProcess, model: str = "tiny") -> str:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    done = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    return done.choices[0].text


def active_key(http: httpx.Client) -> str:
    artifacts = http.get("/admin/artifacts", headers=AUTH).json()["data"]
    return next(a["key"] for a in artifacts if a["active"])


@pytest.mark.parametrize("fmt", ["gguf", "compressed-tensors"])
def test_export_import_serve_gives_the_same_greedy_output(
    source: tuple[ServerProcess, Path], fmt: str, tmp_path: Path
) -> None:
    server, _ = source
    expected = greedy(server)
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        response = http.get(f"/admin/artifacts/{active_key(http)}/export",
                            params={"format": fmt}, headers=AUTH)
    assert response.status_code == 200, response.text
    if fmt == "gguf":
        assert response.headers["content-type"] == "application/octet-stream"
        model_path = tmp_path / "export.gguf"
        model_path.write_bytes(response.content)
        env = {"QUANTSERVE_GGUF_WEIGHTS": "quantized"}
    else:
        assert response.headers["content-type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            tar.extractall(tmp_path, filter="data")
        (model_path,) = list(tmp_path.iterdir())
        env = {}
    assert "attachment" in response.headers["content-disposition"]
    with running_server(tmp_path, env={"QUANTSERVE_MODEL": str(model_path),
                                       "QUANTSERVE_MODEL_ID": "tiny", **env}) as imported:
        models = httpx.get(f"{imported.base_url}/v1/models").json()
        assert greedy(imported) == expected
    assert models["data"][0]["id"] == "tiny"


@pytest.mark.parametrize(("path", "params", "headers", "status", "param"), [
    ("/admin/artifacts/" + "0" * 64 + "/export", {"format": "gguf"}, AUTH, 404, "key"),
    ("/admin/artifacts/not-a-key/export", {"format": "gguf"}, AUTH, 404, "key"),
    ("KEY", {"format": "onnx"}, AUTH, 422, "format"),
    ("KEY", {}, AUTH, 422, "format"),
    ("KEY", {"format": "gguf"}, {}, 401, None),
])
def test_export_errors_are_openai_shaped(
    source: tuple[ServerProcess, Path], path: str, params: dict[str, str],
    headers: dict[str, str], status: int, param: str | None,
) -> None:
    server, _ = source
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        if path == "KEY":
            path = f"/admin/artifacts/{active_key(http)}/export"
        response = http.get(path, params=params, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param

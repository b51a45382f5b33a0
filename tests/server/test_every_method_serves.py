"""Every registered method, through the real server: `/admin/quantize` with no
calibration object, the swap, a greedy completion equal to the method's own
offline output, then a restart that finds every artifact in the cache.

A tiny random Llama keeps the quantisations to seconds; it takes the same
code paths as SmolLM2 (fused projections, a tied head, the lean runner).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from quantizers import list_methods, quantize
from quantizers.calibration import CalibrationConfig, calibration_batches
from quantizers.loading import LoadedModel, load_model
from quantizers.registry import get_method
from server.engine import Engine, Finish, GenerationRequest, SamplingParams, TokenDelta
from tests.helpers.server_process import running_server
from tests.helpers.tiny_model_dir import write_tiny_model
from tests.server.admin_helpers import AUTH, tiny_env, wait_job

pytestmark = pytest.mark.slow

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]
NEW_TOKENS = 8
# mixed has no default budget: without one it is a 422 naming the fields to set.
CONFIGS = {"mixed": {"target_bits_per_weight": 6.0}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("every-method") / "model")


def offline_output(model_dir: Path, method: str) -> tuple[str, int]:
    """What the library alone makes of the method: quantise with the documented
    default calibration, then the greedy text (and its token count) from an
    engine in this process."""
    base = load_model(model_dir, dtype="float32", model_id="tiny")
    batches = (calibration_batches(base.tokenizer, CalibrationConfig())
               if get_method(method).calibrated else None)
    report = quantize(base.model, method, CONFIGS.get(method, {}), calibration=batches)
    loaded = LoadedModel(model_id="tiny", model=base.model, tokenizer=base.tokenizer,
                         source=base.source, dtype=base.model.dtype,
                         quantization={"method": report.method})
    engine = Engine(loaded, num_threads=1)
    engine.start()

    async def run() -> tuple[str, int]:
        request = GenerationRequest("offline", PROMPT,
                                    SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
        text, tokens = "", 0
        async for event in engine.generate(request):
            if isinstance(event, TokenDelta):
                text += event.text
                tokens += len(event.token_ids)
            assert not isinstance(event, Finish) or event.error is None
        return text, tokens

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown(drain_timeout_s=5)


def served_output(client: httpx.Client) -> tuple[str, int]:
    response = client.post("/v1/completions", json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["text"], body["usage"]["completion_tokens"]


def test_every_method_quantises_serves_and_is_cached_across_a_restart(
    model_dir: Path, tmp_path: Path
) -> None:
    # The project's methods: other test modules register throwaway ones in this
    # process (tests/reliability/faulty_server.py) that the server never sees.
    methods = [m for m in list_methods()
               if get_method(m).apply.__module__.startswith("quantizers.methods.")]
    assert len(methods) >= 11
    env = tiny_env(model_dir, QUANTSERVE_CACHE_DIR=str(tmp_path / "cache"))
    served: dict[str, tuple[str, int]] = {}
    keys: dict[str, str] = {}
    with running_server(tmp_path, env=env) as server, httpx.Client(
        base_url=server.base_url, timeout=120
    ) as client:
        refused = client.post("/admin/quantize", headers=AUTH, json={"method": "mixed"})
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "config.target_bits_per_weight"
        for method in methods:
            response = client.post("/admin/quantize", headers=AUTH,
                                   json={"method": method, "config": CONFIGS.get(method, {})})
            assert response.status_code == 202, (method, response.text)
            job = wait_job(client, response.json()["status_url"], timeout=300)
            assert job["state"] == "succeeded", (method, job["error"])
            keys[method] = job["artifact_key"]
            model = client.get("/v1/models").json()["data"][0]
            assert model["quantization"]["method"] == method
            served[method] = served_output(client)
    for method in methods:
        assert served[method] == offline_output(model_dir, method), method

    with running_server(tmp_path, env=env) as server, httpx.Client(
        base_url=server.base_url, timeout=120
    ) as client:
        for method in methods:
            response = client.post("/admin/quantize", headers=AUTH,
                                   json={"method": method, "config": CONFIGS.get(method, {})})
            assert response.status_code == 200, (method, response.text)
            hit = response.json()
            assert hit["status"] == "cached" and hit["artifact"]["key"] == keys[method]
            assert served_output(client) == served[method], method

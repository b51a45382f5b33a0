"""Every architecture transformers ships serves and quantises, over real HTTP.

One real server per architecture (tiny random models, float32): greedy output
equals transformers' own `generate`, alone and batched; int8, int4 and GPTQ
variants are built by admin jobs and served; a second server on the same cache
finds the GPTQ artifact in the cache and serves it without rebuilding.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers.server_process import running_server
from tests.helpers.tiny_architectures import EOS_ID, write_tiny_architecture
from tests.server.admin_helpers import AUTH, tiny_env, wait_job

pytestmark = pytest.mark.slow

# Not llama: the tiny Llama of the admin tests covers the lean path.
GENERAL = ["qwen3", "gemma3_text", "phi3", "gpt2", "gpt_neox", "olmo2", "granite"]
PROMPTS = [list(b"The quick brown fox jumps over"), list(b"Hi")]
NEW_TOKENS = 12
# Past gemma3_text's sliding window of 6, so both of its layer kinds are exercised.
GPTQ = {"method": "gptq", "config": {"group_size": 32},
        "calibration": {"samples": 8, "seq_len": 64}}


def reference(model: Any, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (up to EOS) and their logprobs."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=EOS_ID, pad_token_id=EOS_ID, output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [
        float(torch.log_softmax(score[0].float(), -1)[token])
        for score, token in zip(out.scores, tokens, strict=True)
    ]
    if EOS_ID in tokens:
        cut = tokens.index(EOS_ID)
        tokens, logprobs = tokens[:cut], logprobs[:cut]
    return tokens, logprobs


def complete(client: httpx.Client, prompt: list[int] | list[list[int]]) -> list[dict[str, Any]]:
    response = client.post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
        "logprobs": 0,
    })
    assert response.status_code == 200, response.text
    return sorted(response.json()["choices"], key=lambda c: c["index"])


def same_tokens(choice: dict[str, Any], tokens: list[str], logprobs: list[float]) -> None:
    assert choice["logprobs"]["tokens"] == tokens
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(logprobs, abs=1e-3)


@pytest.mark.parametrize("model_type", GENERAL)
def test_architecture_serves_and_quantises(tmp_path: Path, model_type: str) -> None:
    model_dir = write_tiny_architecture(tmp_path / "model", model_type)
    # The model as transformers loads it (GPT-2's Conv1D unconverted), float32.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = [reference(model, p) for p in PROMPTS]
    env = tiny_env(model_dir, QUANTSERVE_DTYPE="float32", QUANTSERVE_MAX_NUM_SEQS="4")
    with running_server(tmp_path, env=env) as server, httpx.Client(
        base_url=server.base_url, timeout=120
    ) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["architecture"] == type(model).__name__
        assert f"general runner serves tiny ({type(model).__name__}, float)" in server.log()
        texts = []
        for prompt, (tokens, logprobs) in zip(PROMPTS, expected, strict=True):
            texts.append(complete(client, prompt)[0])
            same_tokens(texts[-1], [tokenizer.decode([t]) for t in tokens], logprobs)
        together = complete(client, PROMPTS)
        with ThreadPoolExecutor(2) as pool:
            concurrent = list(pool.map(lambda p: complete(client, p)[0], PROMPTS))
        for alone, one, other in zip(texts, together, concurrent, strict=True):
            for batched in (one, other):
                same_tokens(batched, alone["logprobs"]["tokens"],
                            alone["logprobs"]["token_logprobs"])
        chat = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        })
        if tokenizer.chat_template:
            assert chat.status_code == 200, chat.text
        else:
            assert chat.status_code == 400, chat.text
            assert chat.json()["error"]["param"] == "messages"

        for request in ({"method": "int8"}, {"method": "int4", "config": {"group_size": 32}},
                        GPTQ):
            accepted = client.post("/admin/quantize", json=request, headers=AUTH)
            assert accepted.status_code == 202, accepted.text
            job = wait_job(client, accepted.json()["status_url"])
            assert job["state"] == "succeeded", job
            served = client.post("/v1/completions", json={
                "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4,
            }).json()
            assert served["system_fingerprint"] == request["method"]
            assert client.get("/v1/models").json()["data"][0]["variant"] == request["method"]

    with running_server(tmp_path, env=env) as again, httpx.Client(
        base_url=again.base_url, timeout=120
    ) as client:
        hit = client.post("/admin/quantize", json=GPTQ, headers=AUTH)
        assert hit.status_code == 200 and hit.json()["status"] == "cached", hit.text
        served = client.post("/v1/completions", json={
            "model": "tiny", "prompt": PROMPTS[1], "max_tokens": 4,
        })
        assert served.json()["system_fingerprint"] == "gptq"

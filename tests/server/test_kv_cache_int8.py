"""`--kv-cache-dtype int8` over real HTTP: the tiny Llama served twice, bf16
(the shipped dtype) with the KV cache in bf16 and in int8, same budget.

Asserted: the same greedy tokens, each token's log-prob within 0.05 of the
bf16 cache's (int8 rows round each number to within max|row|/254; measured
differences on this model are below 0.01, and a broken scale or row gives
differences of whole units) and not all equal (the int8 path really ran);
more blocks for the same budget (a row of this model's 16 numbers is 32 bytes
in bf16, 18 in int8: 16 codes and a float16 scale; SmolLM2's rows of 64 are
128 against 66); /metrics reporting the int8 block bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from quantizers.kv_int8 import row_bytes
from tests.helpers.server_process import ServerProcess, running_server
from tests.helpers.tiny_model_dir import write_tiny_model

pytestmark = pytest.mark.slow

BUDGET = 4 << 20
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello there", "1 2 3 4 5 6 7"]
# The tiny model: 2 layers, 2 KV heads of 16.
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


def _block_bytes(kv_cache_dtype: str) -> int:
    return 2 * LAYERS * KV_HEADS * 16 * row_bytes(HEAD_DIM, kv_cache_dtype, torch.bfloat16)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    model = write_tiny_model(tmp_path_factory.mktemp("model"))
    env = {
        "QUANTSERVE_MODEL": str(model),
        "QUANTSERVE_MODEL_ID": "tiny",
        "QUANTSERVE_KV_CACHE_BYTES": str(BUDGET),
    }
    with (
        running_server(tmp_path_factory.mktemp("auto"), env=env) as auto,
        running_server(
            tmp_path_factory.mktemp("int8"), env=env, args=["--kv-cache-dtype", "int8"]
        ) as int8,
    ):
        yield {"auto": auto, "int8": int8}


def _greedy(server: ServerProcess, prompt: str) -> tuple[list[str], list[float]]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    choice = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        logprobs=0,
    ).choices[0]
    assert choice.logprobs is not None
    return list(choice.logprobs.tokens or []), list(choice.logprobs.token_logprobs or [])


def _metrics(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(metrics: dict, name: str, **labels: str) -> float:
    found = [
        v
        for (n, ls), v in metrics.items()
        if n == name and all((k, v2) in ls for k, v2 in labels.items())
    ]
    assert len(found) == 1, (name, labels)
    return found[0]


def test_int8_greedy_output_is_close_to_bf16(servers: dict[str, ServerProcess]) -> None:
    largest = 0.0
    for prompt in PROMPTS:
        tokens, reference = _greedy(servers["auto"], prompt)
        int8_tokens, logprobs = _greedy(servers["int8"], prompt)
        assert int8_tokens == tokens
        diffs = [abs(a - b) for a, b in zip(logprobs, reference, strict=True)]
        assert max(diffs) < 0.05, diffs
        largest = max(largest, *diffs)
    assert largest > 0


def test_int8_pool_holds_more_blocks_and_reports_its_bytes(
    servers: dict[str, ServerProcess],
) -> None:
    _greedy(servers["int8"], PROMPTS[0])
    auto, int8 = _metrics(servers["auto"]), _metrics(servers["int8"])
    totals = {
        name: _value(m, "quantserve_kv_cache_blocks", state="total")
        for name, m in (("auto", auto), ("int8", int8))
    }
    assert totals == {name: BUDGET // _block_bytes(name) for name in totals}
    assert totals["int8"] / totals["auto"] > 1.75
    held = sum(_value(int8, "quantserve_kv_cache_blocks", state=s) for s in ("used", "cached"))
    assert held > 0
    kv_bytes = _value(int8, "quantserve_kv_cache_bytes")
    assert kv_bytes == held * _block_bytes("int8")
    assert _value(int8, "quantserve_memory_breakdown_bytes", component="kv_cache") == kv_bytes

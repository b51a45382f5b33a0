"""The OpenAI-compatible API, driven by the official `openai` client against a
real uvicorn server on the embedded SmolLM2 model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server_process import ServerProcess
from tests.server.conftest import API_KEY, MODEL

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_completion_answers_sensibly(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=8, temperature=0)
    assert "Paris" in out.choices[0].text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None
    assert out.usage.prompt_tokens == 5
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_ignore_eos_generates_max_tokens(client: openai.OpenAI) -> None:
    """vLLM's `ignore_eos`: the answer that ends at end-of-sequence runs on to
    max_tokens instead."""
    ask = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 40,
           "temperature": 0}
    ends = client.completions.create(**ask)
    assert ends.choices[0].finish_reason == "stop"
    assert ends.usage is not None and ends.usage.completion_tokens < 40
    runs_on = client.completions.create(**ask, extra_body={"ignore_eos": True})
    assert runs_on.choices[0].finish_reason == "length"
    assert runs_on.usage is not None and runs_on.usage.completion_tokens == 40
    assert runs_on.choices[0].text.startswith(ends.choices[0].text)


def test_chat_completion_uses_template(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0,
    )
    message = out.choices[0].message
    assert message.role == "assistant"
    assert "Paris" in (message.content or "")
    assert "<|im_end|>" not in (message.content or "")
    assert out.usage is not None and out.usage.prompt_tokens > 20  # the system prompt is in


def test_stream_equals_non_stream_at_temperature_zero(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.finish_reason
    assert all(r is None for r in reasons[:-1])


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}],
              "max_tokens": 20, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 5


def test_stop_string_ends_generation(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0).choices[0].text
    assert "6" in free  # the model counts on; so stopping at "6" must cut it
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                    temperature=0, stop=["6"]).choices[0]
    assert out.finish_reason == "stop"
    assert "6" not in out.text
    assert free.startswith(out.text)


def test_seed_gives_the_same_text(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "My favourite animal is", "max_tokens": 16,
              "temperature": 1.0}
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    second = client.completions.create(seed=1234, **kwargs).choices[0].text
    others = {client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert first == second
    assert len(others | {first}) > 1


def test_several_prompts_and_n(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], n=2,
                                    max_tokens=4, temperature=0.8, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert out.usage is not None and 4 <= out.usage.completion_tokens <= 16


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=1, temperature=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text.startswith("The capital of France is")
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == 5 + 1
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # The chosen token at temperature 0 is the most likely one.
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-4)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3,
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == out.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_models_lists_the_served_variant(client: openai.OpenAI, served: ServerProcess) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    card = httpx.get(f"{served.base_url}/v1/models", headers=AUTH).json()["data"][0]
    assert card["variant"] == "float" and card["quantization"] is None
    assert card["parameters"] > 100_000_000 and card["weight_bytes"] > 0
    assert card["dtype"] in ("bfloat16", "float32")
    assert card["architecture"] == "LlamaForCausalLM"
    assert "lean runner serves" in served.log(), "SmolLM2 keeps the lean path"


def test_health_answers_during_a_long_generation(served: ServerProcess) -> None:
    done = threading.Event()

    def long_request() -> None:
        httpx.post(f"{served.base_url}/v1/completions", headers=AUTH, timeout=120, json={
            # Counting never meets EOS, so all 400 tokens are generated (seconds here).
            "model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400,
            "temperature": 0})
        done.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert httpx.get(f"{served.base_url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0
    assert not done.is_set()  # the generation was still running
    worker.join()


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"prompt": 123}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [[]]}, 400, "prompt"),
        ({"prompt": [10**9]}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 9000}, 400, "max_tokens"),
        ({"prompt": "hi", "model": "../../etc/passwd"}, 404, "model"),
        ({"prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
        ({"prompt": "hi", "n": 1000}, 400, "n"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "hi", "suffix": "tail"}, 400, "suffix"),
    ],
)
def test_bad_completion_requests(served: ServerProcess, payload: dict[str, object],
                                 status: int, param: str) -> None:
    body = {"model": MODEL, **payload}
    r = httpx.post(f"{served.base_url}/v1/completions", headers=AUTH, json=body, timeout=30)
    assert _error(r, status)["param"] == param


def test_context_length_is_enforced(served: ServerProcess) -> None:
    r = httpx.post(f"{served.base_url}/v1/completions", headers=AUTH, timeout=30, json={
        "model": MODEL, "prompt": "hello " * 8000, "max_tokens": 500})
    assert _error(r, 400)["code"] == "context_length_exceeded"


def test_malformed_json_and_missing_fields(served: ServerProcess) -> None:
    url = f"{served.base_url}/v1/chat/completions"
    r = httpx.post(url, headers={**AUTH, "Content-Type": "application/json"},
                   content=b'{"model": "x", "messages": [', timeout=10)
    _error(r, 400)
    r = httpx.post(url, headers=AUTH, json={"model": MODEL}, timeout=10)
    assert _error(r, 400)["param"] == "messages"
    r = httpx.post(url, headers=AUTH, json={"model": MODEL, "messages": [{"role": "wizard",
                                                                           "content": "x"}]})
    assert _error(r, 400)["param"].startswith("messages[0]")


def test_text_that_is_not_utf8_is_a_400(served: ServerProcess) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    url = f"{served.base_url}/v1/completions"
    # A lone surrogate is valid JSON but no UTF-8 text: the tokenizer cannot take it.
    lone = b'{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % MODEL.encode()
    assert _error(httpx.post(url, headers=headers, content=lone, timeout=30), 400)["param"] == (
        "prompt")
    raw = b'{"model": "%s", "prompt": "caf\xe9", "max_tokens": 2}' % MODEL.encode()
    _error(httpx.post(url, headers=headers, content=raw, timeout=30), 400)
    chat = (b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", '
            b'"content": "\\udfff"}]}' % MODEL.encode())
    r = httpx.post(f"{served.base_url}/v1/chat/completions", headers=headers, content=chat,
                   timeout=30)
    assert _error(r, 400)["param"] == "messages[0].content"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool"}, "messages[1].tool_call_id"),
        ({"role": "tool", "tool_call_id": "call_1"}, "messages[1].content"),
        ({"role": "user"}, "messages[1].content"),
        ({"role": "system", "content": None}, "messages[1].content"),
        ({"role": "assistant"}, "messages[1].content"),
    ],
)
def test_chat_messages_missing_role_specific_fields(
    served: ServerProcess, message: dict[str, object], param: str
) -> None:
    r = httpx.post(f"{served.base_url}/v1/chat/completions", headers=AUTH, timeout=30, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}, message]})
    assert _error(r, 400)["param"] == param


def test_an_assistant_turn_with_tool_calls_needs_no_content(served: ServerProcess) -> None:
    r = httpx.post(f"{served.base_url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "add",
                                                              "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "4"}]})
    assert r.status_code == 200, r.text


def test_oversized_and_deeply_nested_bodies(served: ServerProcess) -> None:
    url = f"{served.base_url}/v1/completions"
    r = httpx.post(url, headers=AUTH, json={"model": MODEL, "prompt": "x" * (2 << 20)},
                   timeout=30)
    _error(r, 413)
    nested = '{"model": "m", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(url, headers={**AUTH, "Content-Type": "application/json"},
                   content=nested.encode(), timeout=30)
    _error(r, 400)


def test_api_key_is_required(served: ServerProcess) -> None:
    url = f"{served.base_url}/v1/models"
    _error(httpx.get(url), 401)
    _error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{served.base_url}/health").status_code == 200


def test_unknown_route_uses_error_shape(served: ServerProcess) -> None:
    _error(httpx.get(f"{served.base_url}/v1/nothing", headers=AUTH), 404)


def test_stream_disconnect_frees_the_server(served: ServerProcess) -> None:
    """A client that leaves mid-stream must not keep the engine busy."""
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1500, "temperature": 0,
            "stream": True}  # counting never meets EOS: only the disconnect can end it early
    with httpx.stream("POST", f"{served.base_url}/v1/completions", headers=AUTH, json=body,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
    # Had the 1500-token generation kept running (about a minute here), the engine would
    # still report it; a freed slot shows within a few seconds.
    deadline = time.monotonic() + 10
    running = None
    while time.monotonic() < deadline:
        running = _gauge(served, "quantserve_requests_running")
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0


def _gauge(served: ServerProcess, name: str) -> float:
    text = httpx.get(f"{served.base_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        total += sum(s.value for s in family.samples if s.name == name)
    return total

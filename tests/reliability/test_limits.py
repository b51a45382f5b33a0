"""Every limit answers with a clear OpenAI error naming the parameter, and
hostile bytes (bad UTF-8, deep nesting, control characters, emoji, paths in
`model`) are answered without a 5xx and without touching the filesystem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.server_process import ServerProcess
from tests.reliability.conftest import MAX_BODY_BYTES, MAX_COMPLETION_TOKENS
from tests.reliability.fuzzing import error_shape_problem
from tests.reliability.serving import ADMIN_AUTH, API_AUTH, MODEL_ID

pytestmark = pytest.mark.slow  # real server processes (tiny model)

CONTEXT = 512  # the tiny model's context; its tokenizer is one token per byte


def post(http: httpx.Client, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return http.post(path, json=body, headers={**API_AUTH, **kwargs.pop("headers", {})},
                     **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None,
                 code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert error_shape_problem(status, response.content) is None
    error = response.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert error["message"], "the message says what is wrong"
    return error


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"prompt": "x" * (CONTEXT + 10)}, "prompt", "context_length_exceeded"),
    ({"prompt": "hi", "max_tokens": MAX_COMPLETION_TOKENS + 1}, "max_tokens", "invalid_value"),
    ({"prompt": "hi", "n": 9}, "n", "invalid_value"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"prompt": ["hi"] * 33}, "prompt", "invalid_value"),
    ({"prompt": [7] * 10 + [10_000]}, "prompt", "invalid_value"),
    ({"prompt": 123}, "prompt", "invalid_value"),
    ({"prompt": {"text": "hi"}}, "prompt", "invalid_value"),
    ({"prompt": "hi", "max_tokens": "lots"}, "max_tokens", "invalid_value"),
    ({"prompt": "hi", "temperature": -1}, "temperature", "invalid_value"),
])
def test_completion_limits_name_the_parameter(
    http: httpx.Client, body: dict[str, Any], param: str, code: str
) -> None:
    assert_error(post(http, "/v1/completions", {"model": MODEL_ID, **body}), 400, param, code)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x" * (CONTEXT + 10)}]}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99}, "max_tokens"),
])
def test_chat_limits_name_the_parameter(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    assert_error(post(http, "/v1/chat/completions", {"model": MODEL_ID, **body}), 400, param)


def test_body_over_the_limit_is_413_before_parsing(http: httpx.Client) -> None:
    big = {"model": MODEL_ID, "prompt": "x" * MAX_BODY_BYTES}
    assert_error(post(http, "/v1/completions", big), 413, None, "request_too_large")

    def chunks() -> Any:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    chunked = http.post("/v1/completions", content=chunks(),
                        headers={**API_AUTH, "Content-Type": "application/json"})
    assert_error(chunked, 413, None, "request_too_large")


@pytest.mark.parametrize("depth", [100, 5_000, 20_000])
def test_deeply_nested_json_is_refused_cleanly(http: httpx.Client, depth: int) -> None:
    nested = '{"model": "tiny", "prompt": ' + "[" * depth + "1" + "]" * depth + "}"
    response = http.post("/v1/completions", content=nested.encode(),
                         headers={**API_AUTH, "Content-Type": "application/json"})
    if len(nested) > MAX_BODY_BYTES:
        assert_error(response, 413, None)
    else:
        assert response.status_code == 400, response.text
        assert error_shape_problem(400, response.content) is None


@pytest.mark.parametrize("raw", [
    b'{"model": "tiny", "prompt": "\xff\xfe\xfd"}',
    b'\xef\xbb\xbf{"model": "tiny", "prompt": "hi"}',
    b'{"model": "tiny", "prompt": "hi"',
    b"\x00\x01\x02",
    b"",
])
def test_non_utf8_and_broken_bodies_are_400(http: httpx.Client, raw: bytes) -> None:
    response = http.post("/v1/completions", content=raw,
                         headers={**API_AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert error_shape_problem(400, response.content) is None


HOSTILE_PROMPTS = [
    "\x00\x01\x02\x1b[31mred\x1b[0m\x7f",
    "\u202eevil\u202c \u200b\ufeff zero-width",
    "🦙🔥 👩‍👩‍👧‍👦 🇫🇷 e\u0301",
    "\ud7ff\ue000\U0010ffff",
    "\r\n\t" * 20,
]


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
def test_control_characters_and_emoji_round_trip(http: httpx.Client, prompt: str) -> None:
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 8, "echo": True,
            "temperature": 0}
    response = post(http, "/v1/completions", body)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    assert text.startswith(prompt), "the prompt is echoed byte for byte"

    chat = post(http, "/v1/chat/completions", {
        "model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
    assert chat.status_code == 200, chat.text

    with http.stream("POST", "/v1/completions", json={**body, "stream": True},
                     headers=API_AUTH) as stream:
        assert stream.status_code == 200
        events = [line.removeprefix("data: ") for line in stream.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                       if json.loads(e)["choices"])
    assert streamed.startswith(prompt)


def test_model_names_are_compared_never_opened(
    http: httpx.Client, served: ServerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    names = ["../../../../etc/passwd", str(tiny_model), f"../{tiny_model.name}",
             "/dev/zero", "\x00", str(victim), "..\\..\\windows\\win.ini", "%2e%2e%2fetc"]
    for name in names:
        response = post(http, "/v1/completions", {"model": name, "prompt": "hi"})
        error = assert_error(response, 404, "model", "model_not_found")
        assert "root:" not in error["message"]
    for key in (f"../../../../{victim}", "..%2F..%2Fvictim", "../" * 10 + "etc/passwd"):
        deleted = http.delete(f"/admin/artifacts/{key}", headers=ADMIN_AUTH)
        assert deleted.status_code == 404, deleted.text
        activated = http.post("/admin/activate", json={"artifact": key}, headers=ADMIN_AUTH)
        assert_error(activated, 422, "artifact")
    assert victim.read_text() == "keep me"
    assert served.process.poll() is None
    assert post(http, "/v1/completions", {"model": MODEL_ID, "prompt": "hi",
                                          "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("params", [
    {"top_p": 0, "temperature": 1},
    {"top_p": 1e-9, "temperature": 2},
    {"temperature": 1e-9},
    {"seed": 2**63 - 1, "n": 2, "temperature": 1},
    {"seed": -(2**63), "temperature": 1},
])
def test_extreme_sampling_values_still_generate(http: httpx.Client, params: dict) -> None:
    """Found by the nightly fuzz: `top_p: 0` used to empty the nucleus (500)."""
    for path, prompt in (("/v1/completions", {"prompt": "hi"}),
                         ("/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}]})):
        response = post(http, path, {"model": MODEL_ID, "max_tokens": 4, **prompt, **params})
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            assert_error(response, 400, "seed")

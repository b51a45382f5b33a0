"""`POST /v1/completions`: text completion, OpenAI-compatible, streaming or not."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from quantizers.loading import LoadedModel
from server.choices import ChoiceResult, ChoiceStream, collect
from server.engine.types import Finish, GenerationRequest, TokenDelta, TokenLogprob
from server.errors import APIError
from server.request_params import (
    adapter_of,
    admit,
    check_length,
    new_id,
    sampling_params,
    unsupported,
)
from server.routes.responding import (
    GENERATION_RESPONSES,
    finish_reason,
    record_finish,
    run_to_completion,
    sse,
    sse_response,
    usage_of,
)
from server.schemas.openai import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from server.settings import Settings

router = APIRouter()


def tokenize_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], loaded: LoadedModel, settings: Settings
) -> tuple[list[list[int]], list[str]]:
    """Token ids and the echo text of every prompt, in all four OpenAI forms."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if len(prompt) > settings.max_prompts and not isinstance(prompt[0], int):
        raise APIError(400, f"at most {settings.max_prompts} prompts per request",
                       param="prompt", code="invalid_value")
    tokenizer = loaded.tokenizer
    vocab = len(tokenizer)
    if isinstance(prompt[0], int):
        prompt = [prompt]  # type: ignore[list-item]
    ids_list: list[list[int]] = []
    texts: list[str] = []
    for item in prompt:
        if isinstance(item, str):
            if item == "":
                raise APIError(400, "prompt must not be empty", param="prompt",
                               code="invalid_value")
            ids_list.append(tokenizer(item).input_ids)
            texts.append(item)
        else:
            if not item:
                raise APIError(400, "prompt must not be empty", param="prompt",
                               code="invalid_value")
            if any(not 0 <= t < vocab for t in item):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                               code="invalid_value")
            ids_list.append(list(item))
            texts.append(tokenizer.decode(item))
    return ids_list, texts


def _logprobs(
    entries: list[tuple[str, TokenLogprob | None]], offset: int
) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy logprobs object; offsets count characters from `offset`."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token, entry in entries:
        out.tokens.append(token)
        out.token_logprobs.append(None if entry is None else entry.logprob)
        out.top_logprobs.append(None if entry is None else dict(entry.top))
        out.text_offset.append(offset)
        offset += len(token)
    return out, offset


def _prompt_entries(
    prompt_ids: list[int], finish: Finish, loaded: LoadedModel
) -> list[tuple[str, TokenLogprob | None]]:
    scored = finish.prompt_logprobs or ()
    entries: list[tuple[str, TokenLogprob | None]] = []
    for i, token_id in enumerate(prompt_ids):
        entry = scored[i] if i < len(scored) else None
        entries.append((entry.token if entry else loaded.tokenizer.decode([token_id]), entry))
    return entries


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Create a text completion",
)
async def create_completion(body: CompletionRequest, request: Request):
    engine, settings, loaded = admit(body, request)
    if body.suffix:
        raise unsupported("suffix", "suffix (insertion) is not supported by this model")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise unsupported("best_of", "best_of must equal n (server-side best-of is not supported)")
    echo = bool(body.echo)
    if body.stream and echo and body.logprobs is not None:
        raise unsupported("echo", "echo with logprobs is supported without stream only")
    prompt_ids, prompt_texts = tokenize_prompts(body.prompt, loaded, settings)
    max_tokens = body.max_tokens or 16
    for ids in prompt_ids:
        check_length(len(ids), max_tokens, loaded, settings, prompt_param="prompt")

    request_id = new_id("cmpl")
    jobs = [
        GenerationRequest(
            request_id=f"{request_id}-{p * n + j}",
            prompt_ids=ids,
            params=sampling_params(body, loaded, max_tokens=max_tokens, logprobs=body.logprobs,
                                   choice=j),
            prompt_logprobs=echo and body.logprobs is not None,
            timeout_s=settings.request_timeout_s,
            adapter=adapter_of(body.model, loaded),
        )
        for p, ids in enumerate(prompt_ids)
        for j in range(n)
    ]
    prompt_total = sum(len(ids) for ids in prompt_ids)
    created = int(time.time())
    model_name = body.model  # the base or the adapter it names

    if body.stream:
        stream = ChoiceStream(engine.generate, jobs)
        await stream.__aenter__()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [len(prompt_texts[index // n]) if echo else 0 for index in range(len(jobs))]

        def chunk(*choices: CompletionChoice, usage: Usage | None = None) -> str:
            return sse(CompletionResponse(id=request_id, created=created, model=model_name,
                                          choices=list(choices), usage=usage))

        def on_delta(index: int, delta: TokenDelta) -> str | None:
            logprobs = None
            if body.logprobs is not None:
                logprobs, offsets[index] = _logprobs(
                    [(e.token, e) for e in delta.logprobs], offsets[index])
            if not delta.text and logprobs is None:
                return None
            return chunk(CompletionChoice(text=delta.text, index=index, logprobs=logprobs))

        return await sse_response(
            request, "completions", stream,
            head=[chunk(CompletionChoice(text=prompt_texts[i // n], index=i))
                  for i in range(len(jobs))] if echo else [],
            on_delta=on_delta,
            on_finish=lambda index, finish: chunk(CompletionChoice(
                text="", index=index, finish_reason=finish_reason(finish))),
            tail=lambda finishes: [chunk(usage=usage_of(prompt_total, finishes))]
            if include_usage else [],
        )

    results: list[ChoiceResult] = await run_to_completion(
        request, ChoiceStream(engine.generate, jobs), len(jobs), collect
    )
    choices = []
    finishes = []
    for index, result in enumerate(results):
        finish = result.finish
        assert finish is not None
        finishes.append(finish)
        record_finish(request, "completions", finish)
        text = result.text
        logprobs = None
        entries: list[tuple[str, TokenLogprob | None]] = []
        if echo:
            text = prompt_texts[index // n] + text
            if body.logprobs is not None:
                entries = _prompt_entries(jobs[index].prompt_ids, finish, loaded)
        if body.logprobs is not None:
            entries += [(e.token, e) for e in result.logprobs]
            logprobs, _ = _logprobs(entries, 0)
        choices.append(CompletionChoice(
            text=text, index=index, logprobs=logprobs, finish_reason=finish_reason(finish)
        ))
    usage: Usage = usage_of(prompt_total, finishes)
    return CompletionResponse(
        id=request_id, created=created, model=model_name, choices=choices, usage=usage,
        system_fingerprint=loaded.variant,
    )

"""`POST /v1/chat/completions`: chat through the model's own chat template."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from quantizers.loading import LoadedModel
from server.choices import ChoiceStream, collect
from server.engine.types import GenerationRequest, TokenDelta, TokenLogprob
from server.errors import APIError
from server.request_params import (
    adapter_of,
    admit,
    check_length,
    context_window,
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
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatTokenLogprob,
    TopLogprob,
)

router = APIRouter()


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise unsupported(f"messages[{index}].content[{j}]",
                              f"content parts of type '{part.type}' are not supported; "
                              "this model reads text only")
        parts.append(part.text)
    return "".join(parts)


def render_prompt(messages: list[ChatMessage], loaded: LoadedModel) -> list[int]:
    """Token ids of the conversation through the model's chat template."""
    conversation = [
        {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m, i)}
        for i, m in enumerate(messages)
    ]
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions",
                       param="messages", code="unsupported_model")
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def _chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(content=[
        ChatTokenLogprob(
            token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
            top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                          for t, lp in e.top],
        )
        for e in entries
    ])


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Create a chat completion",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    for i, message in enumerate(body.messages):
        if (field := message.missing_field()) is not None:
            raise APIError(400, f"messages[{i}].{field} is required for role '{message.role}'",
                           param=f"messages[{i}].{field}", code="missing_required_parameter")
    engine, settings, loaded = admit(body, request)
    if body.tools:
        raise unsupported("tools", "tool calling is not supported by this server")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "only response_format type 'text' is supported")
    prompt_ids = render_prompt(body.messages, loaded)
    requested = body.max_completion_tokens or body.max_tokens
    room = context_window(loaded, settings) - len(prompt_ids)
    max_tokens = requested or max(1, min(room, settings.max_completion_tokens))
    check_length(len(prompt_ids), max_tokens, loaded, settings, prompt_param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                       code="invalid_value")
    n = body.n or 1
    request_id = new_id("chatcmpl")
    jobs = [
        GenerationRequest(
            request_id=f"{request_id}-{j}",
            prompt_ids=prompt_ids,
            params=sampling_params(body, loaded, max_tokens=max_tokens, logprobs=logprobs,
                                   choice=j),
            timeout_s=settings.request_timeout_s,
            adapter=adapter_of(body.model, loaded),
        )
        for j in range(n)
    ]
    created = int(time.time())
    model_name = body.model  # the base or the adapter it names

    def chunk(choices: list[ChatChunkChoice], **extra: object) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                       system_fingerprint=loaded.variant, choices=choices,
                                       **extra))

    if body.stream:
        stream = ChoiceStream(engine.generate, jobs)
        await stream.__aenter__()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def on_delta(index: int, delta: TokenDelta) -> str | None:
            if not delta.text and not delta.logprobs:
                return None
            return chunk([ChatChunkChoice(
                index=index, delta=ChatDelta(content=delta.text),
                logprobs=_chat_logprobs(delta.logprobs) if logprobs is not None else None,
            )])

        return await sse_response(
            request, "chat", stream,
            head=[chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                  for i in range(n)],
            on_delta=on_delta,
            on_finish=lambda index, finish: chunk([ChatChunkChoice(
                index=index, delta=ChatDelta(), finish_reason=finish_reason(finish))]),
            tail=lambda finishes: [chunk([], usage=usage_of(len(prompt_ids), finishes))]
            if include_usage else [],
        )

    results = await run_to_completion(request, ChoiceStream(engine.generate, jobs), n, collect)
    choices = []
    finishes = []
    for index, result in enumerate(results):
        assert result.finish is not None
        finishes.append(result.finish)
        record_finish(request, "chat", result.finish)
        choices.append(ChatChoice(
            index=index,
            message=AssistantMessage(content=result.text),
            logprobs=_chat_logprobs(result.logprobs) if logprobs is not None else None,
            finish_reason=finish_reason(result.finish),
        ))
    return ChatCompletionResponse(
        id=request_id, created=created, model=model_name, system_fingerprint=loaded.variant,
        choices=choices, usage=usage_of(len(prompt_ids), finishes),
    )

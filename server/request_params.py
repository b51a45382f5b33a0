"""Checks and conversions shared by the completion and chat routes.

Everything a request asks for is validated here against the served model and
the operator's limits *before* any work is queued, so a bad request costs
nothing and always gets a 400 that names the parameter.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request

from quantizers.loading import LoadedModel
from server.engine import Engine
from server.engine.types import SamplingParams
from server.errors import APIError
from server.schemas.openai import _Request
from server.settings import Settings


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(requested: str, loaded: LoadedModel, adapters: list[str]) -> None:
    """The served model or one of its loaded LoRA adapters answers; the name is
    compared, never used as a path."""
    if requested != loaded.model_id and requested not in adapters:
        raise APIError(
            404,
            f"The model '{requested[:200]}' does not exist; this server serves "
            f"'{loaded.model_id}'" + (f" and its adapters {adapters}." if adapters else "."),
            param="model",
            code="model_not_found",
        )


def adapter_of(requested: str, loaded: LoadedModel) -> str | None:
    """The LoRA adapter a request's `model` names; None for the base model."""
    return None if requested == loaded.model_id else requested


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def check_common(req: _Request, settings: Settings) -> None:
    """Parameters both endpoints share, against what this server implements."""
    if (req.n or 1) > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}", param="n", code="invalid_value")
    stops = stop_list(req.stop)
    if len(stops) > settings.max_stop:
        raise APIError(
            400, f"at most {settings.max_stop} stop sequences are allowed", param="stop",
            code="invalid_value",
        )
    if any(len(s) > 256 for s in stops):
        raise APIError(400, "stop sequences must be at most 256 characters", param="stop",
                       code="invalid_value")
    if req.logit_bias:
        raise unsupported("logit_bias", "logit_bias is not supported by this server")
    if req.presence_penalty:
        raise unsupported("presence_penalty", "presence_penalty is not supported; send 0")
    if req.frequency_penalty:
        raise unsupported("frequency_penalty", "frequency_penalty is not supported; send 0")


def admit(req: _Request, request: Request) -> tuple[Engine, Settings, LoadedModel]:
    """The engine, settings and served model for a request whose model name and
    shared parameters have passed their checks. The model is read once, so the
    whole request sees one variant even if a swap happens meanwhile."""
    engine: Engine = request.app.state.engine
    settings: Settings = request.app.state.settings
    loaded = engine.loaded
    check_model(req.model, loaded, [a.name for a in engine.adapters()])
    check_common(req, settings)
    return engine, settings, loaded


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def context_window(loaded: LoadedModel, settings: Settings) -> int:
    """Tokens one sequence may hold: the model's context, capped by the
    operator's QUANTSERVE_MAX_MODEL_LEN."""
    return min(loaded.context_length, settings.max_model_len)


def check_length(
    prompt_tokens: int, max_tokens: int, loaded: LoadedModel, settings: Settings,
    *, prompt_param: str,
) -> None:
    """Prompt + completion must fit the context window and the operator's cap."""
    context = context_window(loaded, settings)
    if prompt_tokens >= context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens, but the prompt has "
            f"{prompt_tokens} tokens.",
            param=prompt_param, code="context_length_exceeded",
        )
    if max_tokens > settings.max_completion_tokens:
        raise APIError(
            400, f"max_tokens must be at most {settings.max_completion_tokens}",
            param="max_tokens", code="invalid_value",
        )
    if prompt_tokens + max_tokens > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )


def stop_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """EOS ids from the tokenizer and the generation config (it may list several)."""
    ids: set[int] = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    generation_config = getattr(loaded.model, "generation_config", None)
    config_eos: Any = getattr(generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list | tuple):
        ids.update(int(i) for i in config_eos)
    return tuple(sorted(ids))


def sampling_params(
    req: _Request, loaded: LoadedModel, *, max_tokens: int, logprobs: int | None, choice: int,
) -> SamplingParams:
    """One choice's sampling settings; choice i of a seeded request uses seed + i,
    so `n > 1` gives different texts and the same request gives the same texts."""
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=None if req.seed is None else req.seed + choice,
        stop=tuple(stop_list(req.stop)),
        stop_token_ids=() if req.ignore_eos else stop_token_ids(loaded),
        logprobs=logprobs,
        ignore_eos=bool(req.ignore_eos),
    )

"""`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`: vLLM's run-time LoRA API.

Guarded by the admin token (the path names a directory on the server). Plain
`def` routes: reading an adapter's files runs in FastAPI's thread pool, never
on the event loop. Every refusal is a 4xx that says why: the path is not a
PEFT LoRA adapter, it does not fit the served model, or the name is taken.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from quantizers.lora import AdapterFormatError, read_adapter
from server.engine import Engine
from server.engine.adapters import DuplicateAdapter, UnknownAdapter
from server.engine.lora import AdapterMismatch
from server.errors import APIError, error_responses
from server.routes.responding import ERROR_RESPONSES
from server.schemas.openai import (
    LoadLoraAdapterRequest,
    LoraAdapterResult,
    UnloadLoraAdapterRequest,
)

router = APIRouter(
    tags=["lora"],
    responses={
        **ERROR_RESPONSES,
        **error_responses({
            403: "Wrong admin token",
            404: "No such adapter, or the admin API is disabled (no admin token configured)",
        }),
    },
)


@router.post(
    "/load_lora_adapter",
    response_model=LoraAdapterResult,
    summary="Load a LoRA adapter (PEFT format) under a model name",
)
def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> LoraAdapterResult:
    engine: Engine = request.app.state.engine
    if body.lora_name == engine.loaded.model_id:
        raise APIError(
            400,
            f"'{body.lora_name}' is the base model's name",
            param="lora_name",
            code="invalid_value",
        )
    try:
        adapter = read_adapter(Path(body.lora_path))
    except AdapterFormatError as exc:
        raise APIError(
            400, f"cannot load the adapter: {exc}", param="lora_path", code="invalid_adapter"
        ) from exc
    try:
        evicted = engine.load_adapter(body.lora_name, adapter, body.lora_path)
    except AdapterMismatch as exc:
        raise APIError(
            400,
            f"the adapter does not fit the served model: {exc}",
            param="lora_path",
            code="adapter_mismatch",
        ) from exc
    except DuplicateAdapter as exc:
        raise APIError(400, str(exc), param="lora_name", code="adapter_exists") from exc
    return LoraAdapterResult(id=body.lora_name, parent=engine.loaded.model_id, evicted=evicted)


@router.post(
    "/unload_lora_adapter",
    response_model=LoraAdapterResult,
    summary="Unload a LoRA adapter (requests using it finish first)",
)
def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> LoraAdapterResult:
    engine: Engine = request.app.state.engine
    try:
        engine.unload_adapter(body.lora_name)
    except UnknownAdapter as exc:
        raise APIError(404, str(exc), param="lora_name", code="adapter_not_found") from exc
    return LoraAdapterResult(id=body.lora_name, parent=engine.loaded.model_id)

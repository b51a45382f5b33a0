"""`GET /v1/models`: the served model, the variant it is running as, and its
loaded LoRA adapters (each a model whose `parent` is the base)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from quantizers.loading import LoadedModel
from server.engine.runner_choice import architecture
from server.request_params import context_window
from server.routes.responding import ERROR_RESPONSES
from server.schemas.openai import ModelCard, ModelList

router = APIRouter()


def model_card(loaded: LoadedModel, created: int, context_length: int) -> ModelCard:
    return ModelCard(
        id=loaded.model_id,
        created=created,
        variant=loaded.variant,
        architecture=architecture(loaded.model),
        quantization=loaded.quantization,
        dtype=str(loaded.dtype).removeprefix("torch."),
        parameters=loaded.param_count,
        weight_bytes=loaded.weight_bytes,
        context_length=context_length,
        quality=loaded.metadata.get("quality"),
    )


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES,
            summary="List the served model")
async def list_models(request: Request) -> ModelList:
    engine = request.app.state.engine
    loaded = engine.loaded
    window = context_window(loaded, request.app.state.settings)
    base = model_card(loaded, request.app.state.started_at, window)
    cards = [base]
    for adapter in engine.adapters():
        lora = {"rank": adapter.adapter.rank, "target_modules": adapter.adapter.target_modules}
        cards.append(base.model_copy(update={
            "id": adapter.name, "parent": base.id, "root": adapter.source, "lora": lora,
            "created": adapter.created, "quality": None,
        }))
    return ModelList(data=cards)

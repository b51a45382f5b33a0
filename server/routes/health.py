"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from server.errors import ErrorResponse, error_response

router = APIRouter()


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model: str
    variant: str


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": ErrorResponse, "description": "No model loaded yet, or draining"}},
    summary="Readiness: a model is loaded and requests are accepted",
)
async def ready(request: Request):
    engine = getattr(request.app.state, "engine", None)
    if engine is None or request.app.state.draining:
        return error_response(503, "not ready", code="not_ready")
    loaded = engine.loaded
    return Readiness(status="ready", model=loaded.model_id, variant=loaded.variant)

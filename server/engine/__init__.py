"""The generation engine: continuous batching over a lean decode loop."""

from server.engine.engine import Engine
from server.engine.types import (
    EngineOverloaded,
    EngineShuttingDown,
    EngineStats,
    Finish,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Timings,
    TokenDelta,
    TokenLogprob,
)

__all__ = [
    "Engine",
    "EngineOverloaded",
    "EngineShuttingDown",
    "EngineStats",
    "Finish",
    "FinishReason",
    "GenerationRequest",
    "SamplingParams",
    "Timings",
    "TokenDelta",
    "TokenLogprob",
]

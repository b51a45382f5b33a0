"""The generation engine: continuous batching over a lean decode loop.

Names are imported on first use, so the torch-free parts (`scheduler`,
`block_manager`) can be imported, and tested, without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name == "Engine":
        return import_module("server.engine.engine").Engine
    if name in __all__:
        return getattr(import_module("server.engine.types"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

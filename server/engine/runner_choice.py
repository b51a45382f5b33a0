"""Which runner serves a model: the lean Llama runner where it is exact, else the general one.

The lean runner re-implements the Llama layer (fused projections, prepacked
weights, per-sequence attention) and is the fast path for the families whose
layers are exactly that. Everything else runs on the general runner, which
drives transformers' own modules over the same paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from server.engine.hf_runner import layer_windows
from server.engine.llama_runner import SUPPORTED_MODEL_TYPES

RunnerPath = Literal["lean", "general"]
RunnerMode = Literal["auto", "general"]  # the operator's setting


@dataclass(frozen=True)
class RunnerChoice:
    path: RunnerPath
    reason: str


def architecture(model: nn.Module) -> str:
    """The model's transformers class name, as `/v1/models` reports it."""
    return type(model).__name__


def choose_runner(
    model: nn.Module, max_seq_len: int, mode: RunnerMode = "auto"
) -> RunnerChoice:
    """The lean runner for the Llama families it implements, unless the model
    uses a sliding window it would ignore or the operator asks for the general
    runner; the general runner otherwise."""
    if mode == "general":
        return RunnerChoice("general", "the runner setting asks for it")
    config: Any = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return RunnerChoice(
            "general",
            f"model type {model_type!r} is not one the lean runner implements "
            f"({', '.join(sorted(SUPPORTED_MODEL_TYPES))})",
        )
    windows = [w for w in layer_windows(config, config.num_hidden_layers) if w is not None]
    if windows and min(windows) < max_seq_len:
        return RunnerChoice(
            "general",
            f"its sliding window of {min(windows)} tokens is shorter than max_model_len "
            f"{max_seq_len}, and the lean runner attends globally",
        )
    return RunnerChoice("lean", f"model type {model_type!r} has the Llama layer it implements")

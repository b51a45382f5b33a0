"""A float copy of the model that worker processes can load in under a second.

Every benchmarked variant runs in a fresh process (for an honest peak RSS), and
each needs the float weights: loading SmolLM2 from its GGUF takes ~16 s (the
Q4_1 tensors are dequantised on every load), loading the same float32 weights
from safetensors takes under one. The GGUF origin also makes transformers
refuse `save_pretrained`, so the directory is written from its parts: the
config without the GGUF loader's `quantization_config`, the weights with tied
tensors stored once, and the tokenizer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model


def write_snapshot(model: torch.nn.Module, tokenizer: Any, directory: Path) -> Path:
    """Write `model` (float) and `tokenizer` as a Hugging Face directory."""
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(directory)
    return directory

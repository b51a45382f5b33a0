"""Random LoRA adapters made by `peft` itself, saved in its format, for tests."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_random_adapter(
    model: nn.Module,
    directory: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    targets: Sequence[str] = ALL_LINEAR,
) -> Path:
    """A peft adapter with random A and B (B non-zero, so it changes the output)."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(directory)
    return directory


@torch.inference_mode()
def peft_logits(model: nn.Module, directory: Path, token_ids: list[int]) -> torch.Tensor:
    """float32 logits `[T, vocab]` of `model` with the adapter in `directory`, by peft."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    return peft_model(torch.tensor([token_ids])).logits[0].float()

"""Decode speed at batch 1: the number a single chat user feels.

A plain greedy loop with the model's KV cache, one token per forward, so the
figure measures the model's matmul kernels and nothing of a sampler or server.
The prompt's prefill is not timed. The best of a few repeats is reported,
because on a shared machine the slowest runs measure the neighbours, and a
variant is timed in turns with the float model it is compared against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class DecodeSpeed:
    tokens_per_second: float
    new_tokens: int
    prompt_tokens: int
    repeats: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, float]:
    """Greedy-decode `new_tokens` after `prompt` ([1, P]); returns the new tokens
    and the seconds spent producing them after the prefill."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt.to(device), cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    produced = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=out.cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        produced.append(token)
    elapsed = time.perf_counter() - start
    return torch.cat(produced, dim=1), elapsed


def decode_speeds(
    models: Sequence[torch.nn.Module], prompt: torch.Tensor, new_tokens: int = 32,
    repeats: int = 3,
) -> list[DecodeSpeed]:
    """Tokens per second of greedy decoding after `prompt` for each model, best
    of `repeats`, after one short warm-up run each that pays for lazy setup.

    The models take turns run by run, so a neighbour's load on a shared machine
    hits all of them alike and their ratio stays meaningful.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: the first token comes from the prefill")
    for model in models:
        greedy_decode(model, prompt, 4)
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for index, model in enumerate(models):
            best[index] = min(best[index], greedy_decode(model, prompt, new_tokens)[1])
    return [
        DecodeSpeed(
            tokens_per_second=(new_tokens - 1) / seconds,
            new_tokens=new_tokens,
            prompt_tokens=prompt.shape[1],
            repeats=repeats,
            threads=torch.get_num_threads(),
        )
        for seconds in best
    ]


def decode_speed(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3
) -> DecodeSpeed:
    """Decode speed of one model (see decode_speeds)."""
    return decode_speeds([model], prompt, new_tokens, repeats)[0]

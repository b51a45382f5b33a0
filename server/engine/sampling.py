"""Per-sequence token choice and logprobs for one batched decode step.

Every sequence in a batch keeps its own temperature, top_p, seed and logprobs
setting; the logits come from one batched forward pass. Greedy rows are
resolved together with a single argmax; sampled rows draw from their own
`torch.Generator`, so a seeded request gives the same text whatever else is in
the batch. That generator lives on the logits' device (torch's samplers
refuse a CPU generator for CUDA logits); it is made at the first sampled draw,
so greedy sequences never make one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from server.engine.types import SamplingParams


class SeededGenerator:
    """One sequence's random source: its seed, and a generator on the device
    of the logits it samples from (a sequence's logits stay on one device)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def on(self, device: torch.device) -> torch.Generator:
        """The generator for `device`, seeded on first use."""
        generator = self._generator
        if generator is None or generator.device != device:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generator = generator
        return generator


def make_generator(seed: int | None) -> SeededGenerator:
    """The random source of one sequence: the request's seed, or a fresh random one."""
    return SeededGenerator(seed if seed is not None else secrets.randbits(63))


@dataclass(frozen=True)
class Choice:
    """The token picked for one row plus what logprobs reporting needs."""

    token_id: int
    logprob: float | None  # None when the request did not ask for logprobs
    top: tuple[tuple[int, float], ...] = ()


def _sample_row(logits: torch.Tensor, params: SamplingParams, source: SeededGenerator) -> int:
    generator = source.on(logits.device)
    scaled = logits / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        keep = (cumulative - sorted_probs) < params.top_p
        keep[0] = True  # top_p = 0 would keep nothing: it means the most likely token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[SeededGenerator],
) -> list[Choice]:
    """Pick one token per row of float32 `logits` `[B, vocab]`."""
    greedy = logits.argmax(dim=-1).tolist()
    choices: list[Choice] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        token = greedy[row] if p.temperature <= 0 else _sample_row(logits[row], p, generator)
        if p.logprobs is None:
            choices.append(Choice(token, None))
            continue
        logprobs = torch.log_softmax(logits[row], dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs > 0:
            values, ids = torch.topk(logprobs, p.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        choices.append(Choice(token, float(logprobs[token]), top))
    return choices


def prompt_logprobs(
    logits: torch.Tensor, prompt_ids: list[int], top_k: int
) -> list[tuple[int, float, tuple[tuple[int, float], ...]] | None]:
    """Score each prompt token under the model given the tokens before it.

    `logits` are the prefill's `[T, vocab]` outputs; position t predicts token
    t+1, so the first prompt token has no score (None, as OpenAI reports it).
    """
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
    if top_k > 0:
        values, ids = torch.topk(logprobs, top_k, dim=-1)
        tops = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    scored = zip(prompt_ids[1:], chosen, tops, strict=True)
    return [None, *[(t, lp, top) for t, lp, top in scored]]

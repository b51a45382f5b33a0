"""Helpers that drive the engine's async API from synchronous tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from server.engine import Engine, Finish, GenerationRequest, SamplingParams, TokenDelta


@dataclass
class Result:
    deltas: list[TokenDelta]
    finish: Finish

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]


def request(
    prompt_ids: list[int], request_id: str = "r", prompt_logprobs: bool = False,
    timeout_s: float | None = None, **params: object,
) -> GenerationRequest:
    params.setdefault("max_tokens", 16)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id, prompt_ids, SamplingParams(**params),  # type: ignore[arg-type]
        prompt_logprobs=prompt_logprobs, timeout_s=timeout_s,
    )


async def collect(engine: Engine, req: GenerationRequest) -> Result:
    deltas: list[TokenDelta] = []
    async for item in engine.generate(req):
        if isinstance(item, Finish):
            return Result(deltas, item)
        deltas.append(item)
    raise AssertionError("stream ended without a Finish")


def run(engine: Engine, req: GenerationRequest) -> Result:
    return asyncio.run(collect(engine, req))


def run_all(engine: Engine, reqs: list[GenerationRequest]) -> list[Result]:
    async def main() -> list[Result]:
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    return asyncio.run(main())


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by full, cache-free transformers forward passes."""
    ids = list(prompt_ids)
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]

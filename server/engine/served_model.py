"""A model ready for the engine: the loaded model, its runner and KV cache, warmed up.

Building one allocates the cache and runs the warm-up, so `swap_model` can do
that work before the switch and the first request on the new model pays nothing.
"""

from __future__ import annotations

import logging
import time

import torch

from quantizers.loading import LoadedModel
from server.engine.llama_runner import LlamaRunner

log = logging.getLogger("quantserve.engine")

_WARMUP_PROMPT = 16


def eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """Every id that ends generation unless `ignore_eos`: tokenizer and generation config."""
    ids: set[int] = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    generation_config = getattr(loaded.model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return frozenset(ids)


class ServedModel:
    """One model version as the engine runs it."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int, max_seq_len: int) -> None:
        self.loaded = loaded
        self.max_seq_len = min(max_seq_len, loaded.context_length)
        self.runner = LlamaRunner(loaded.model, max_batch=max_batch, max_seq_len=self.max_seq_len)
        self.eos_ids = eos_token_ids(loaded)
        self.warmup_s = 0.0

    def warm_up(self) -> float:
        """Run the prefill and every decode batch size once so first requests pay no
        one-off costs (allocator growth, kernel selection, lazy packing)."""
        start = time.perf_counter()
        runner = self.runner
        prompt = [0] * min(_WARMUP_PROMPT, self.max_seq_len - 1)
        runner.prefill(0, prompt)
        for batch in range(1, runner.max_batch + 1):
            positions = torch.full((batch,), len(prompt), dtype=torch.long)
            runner.decode(torch.zeros(batch, dtype=torch.long), positions)
        self.warmup_s = time.perf_counter() - start
        log.info(
            "warm-up of %s (%s) took %.2f s", self.loaded.model_id, self.loaded.variant,
            self.warmup_s,
        )
        return self.warmup_s

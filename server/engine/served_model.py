"""A model ready for the engine: the loaded model, its runner and KV cache, warmed up.

Building one allocates the cache and prepares the weights, and `warm_up` runs
every decode batch size once (compiling the decode step first when asked), so
`swap_model` can do that work before the switch and the first request on the
new model pays nothing.

Compilation (`compile` setting): `off` runs the prepared eager step; `on`
compiles the decode step with `torch.compile` (inductor); `auto`, the default,
compiles on CUDA only. On CUDA the compiled step is replayed as CUDA graphs
(inductor's "reduce-overhead" mode), one per padded (batch, span) shape, all
captured here at warm-up, so at start-up and at each swap, never on a request.
On CPU the prepared eager step is the fast path: the one-row matmuls that
bound decode run on oneDNN's prepacked weights, which inductor cannot trace,
so a compiled step has to use plain weights. Measured on
SmolLM2 bf16, 1 thread, 2 shared cores: the compiled step took 47 ms against
the prepared eager step's 34 ms, and compiling took ~7 minutes cold (~2 with
inductor's on-disk cache warm). A failed compilation is logged and the
model serves eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from torch._dynamo.utils import counters

from quantizers.loading import LoadedModel
from server.engine.llama_runner import LlamaRunner

log = logging.getLogger("quantserve.engine")

_WARMUP_PROMPT = 16

CompileMode = Literal["off", "on", "auto"]
COMPILE_MODES: tuple[CompileMode, ...] = ("off", "on", "auto")


def should_compile(mode: CompileMode, device: torch.device) -> bool:
    """Whether a model on `device` gets a compiled decode step under `mode`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, not {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


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

    def __init__(
        self, loaded: LoadedModel, *, max_batch: int, max_seq_len: int,
        compile: CompileMode = "off",
    ) -> None:
        self.loaded = loaded
        self.max_seq_len = min(max_seq_len, loaded.context_length)
        self.device = next(loaded.model.parameters()).device
        self.compile = should_compile(compile, self.device)
        started = time.perf_counter()
        self.runner = LlamaRunner(
            loaded.model, max_batch=max_batch, max_seq_len=self.max_seq_len,
            prepack=not self.compile,
        )
        self.prepare_s = time.perf_counter() - started
        self.eos_ids = eos_token_ids(loaded)
        self.warmup_s = 0.0
        self.compile_s = 0.0
        self.compile_error: str | None = None

    def warm_up(self) -> float:
        """Compile if asked, then run the prefill and every decode batch size once
        so first requests pay no one-off costs (compilation, allocator growth,
        kernel selection). Returns the seconds of both; `compile_s` holds the
        compilation's share."""
        start = time.perf_counter()
        if self.compile:
            self._compile()
        self._run_every_batch_size()
        self.warmup_s = time.perf_counter() - start
        log.info(
            "warm-up of %s (%s) took %.2f s (weights prepared in %.2f s, decode %s%s)",
            self.loaded.model_id, self.loaded.variant, self.warmup_s, self.prepare_s,
            ("compiled, CUDA graphs" if self.runner.cuda_graphs else "compiled")
            if self.compiled else "eager",
            f", compiled in {self.compile_s:.1f} s" if self.compiled else "",
        )
        return self.warmup_s

    @property
    def compiled(self) -> bool:
        return self.compile and self.compile_error is None

    def _run_every_batch_size(self) -> None:
        runner = self.runner
        prompt = [0] * min(_WARMUP_PROMPT, self.max_seq_len - 1)
        runner.prefill(0, prompt)
        for batch in range(1, runner.max_batch + 1):
            positions = torch.full((batch,), len(prompt), dtype=torch.long, device=runner.device)
            runner.decode(torch.zeros_like(positions), positions)

    def _compile(self) -> None:
        """Compile the decode step on warm-up calls that cover batch 1 (its own
        graph), larger batches and two attention spans (dynamic dimensions).

        Any failure (no C compiler, an op inductor cannot lower) leaves the
        runner eager: a slower server, never a dead one.
        """
        start = time.perf_counter()
        runner = self.runner
        spans = sorted({2, min(_WARMUP_PROMPT, self.max_seq_len - 1)})
        shapes = [(b, s) for b in sorted({1, min(2, runner.max_batch), runner.max_batch})
                  for s in spans]
        skips = counters["inductor"]["cudagraph_skips"]
        try:
            runner.compile_decode(cuda_graphs=self.device.type == "cuda")
            if runner.shape_buckets is not None:
                # every padded shape, twice: a graph is recorded on its second run
                batches, padded_spans = runner.shape_buckets
                shapes = [(b, s) for b in batches for s in padded_spans] * 2
            for batch, span in shapes:
                positions = torch.full(
                    (batch,), span - 1, dtype=torch.long, device=runner.device
                )
                runner.decode(torch.zeros_like(positions), positions)
            if runner.cuda_graphs and counters["inductor"]["cudagraph_skips"] > skips:
                log.warning("torch.compile of %s skipped CUDA graphs (see the inductor log): "
                            "decoding compiled without them", self.loaded.model_id)
                runner.cuda_graphs = False
        except Exception as exc:  # compilation failing must not take the server down
            runner.eager_decode()
            self.compile_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning(
                "torch.compile of %s failed, decoding eagerly: %s", self.loaded.model_id,
                self.compile_error,
            )
        self.compile_s = time.perf_counter() - start

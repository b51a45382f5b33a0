"""A model ready for the engine: the loaded model and its runner, warmed up.

Building one prepares the weights, and `warm_up` runs a prefill and every
decode batch size once, on a private cache of a few blocks (the shared pool may
be in use by the model being replaced) (compiling the decode step first when asked), so
`swap_model` can do that work before the switch and the first request on the
new model pays nothing.

Compilation (`compile` setting): `off` runs the prepared eager step; `on`
compiles the decode step with `torch.compile` (inductor); `auto`, the default,
compiles on CUDA only. On CPU the prepared eager step is the fast path: the
one-row matmuls that bound decode run on oneDNN's prepacked weights, which
inductor cannot trace, so a compiled step has to use plain weights. Measured on
SmolLM2 bf16, 1 thread, 2 shared cores: the compiled step took 47 ms against
the prepared eager step's 34 ms, and compiling took ~7 minutes cold (~2 with
inductor's on-disk cache warm). A failed compilation is logged and the
model serves eagerly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Literal

import torch

from quantizers.loading import LoadedModel
from server.engine.hf_runner import GeneralRunner
from server.engine.kv_cache import KVCache, KVPool, KVSpec
from server.engine.llama_runner import LlamaRunner
from server.engine.lora import LoraHooks
from server.engine.runner_choice import RunnerMode, architecture, choose_runner

log = logging.getLogger("quantserve.engine")

_WARMUP_PROMPT = 16
_WARMUP_BLOCK = 16
# Served models are numbered, never reused, so a prefix cached under one model
# version can never be found by another.
_versions = itertools.count()

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
        self, loaded: LoadedModel, *, max_num_seqs: int, max_model_len: int,
        compile: CompileMode = "off", runner: RunnerMode = "auto", kv_cache_dtype: str = "auto",
    ) -> None:
        self.loaded = loaded
        self.kv_cache_dtype = kv_cache_dtype
        self.version = next(_versions)
        self.max_num_seqs = max_num_seqs
        self.max_seq_len = min(max_model_len, loaded.context_length)
        device = next(loaded.model.parameters()).device
        self.choice = choose_runner(loaded.model, self.max_seq_len, runner)
        # Only the lean runner's decode step is written to be compiled.
        self.compile = self.choice.path == "lean" and should_compile(compile, device)
        started = time.perf_counter()
        self.runner: LlamaRunner | GeneralRunner
        if self.choice.path == "lean":
            self.runner = LlamaRunner(
                loaded.model, max_seq_len=self.max_seq_len, prepack=not self.compile,
                native=not self.compile,
            )
        else:
            self.runner = GeneralRunner(loaded.model)
        log.info(
            "%s runner serves %s (%s, %s): %s", self.choice.path, loaded.model_id,
            architecture(loaded.model), loaded.variant, self.choice.reason,
        )
        self.lora = LoraHooks(self.runner)  # LoRA adapters, applied by the engine
        self.pool: KVPool | None = None  # set by the worker before the model serves
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
        why = getattr(self.runner, "native_unsupported", None)
        log.info(
            "warm-up of %s (%s) took %.2f s (weights prepared in %.2f s, decode %s%s)",
            self.loaded.model_id, self.loaded.variant, self.warmup_s, self.prepare_s,
            self.decode_mode,
            f", compiled in {self.compile_s:.1f} s" if self.compiled
            else f": no native step, {why}" if self.decode_mode == "eager" and why else "",
        )
        return self.warmup_s

    @property
    def decode_mode(self) -> str:
        """How decode steps run: `compiled`, `native` (one C++ call) or `eager`."""
        if self.compiled:
            return "compiled"
        return "native" if getattr(self.runner, "native", None) is not None else "eager"

    @property
    def kv_spec(self) -> KVSpec:
        """The runner's KV shape, stored as `kv_cache_dtype` says."""
        return dataclasses.replace(self.runner.kv_spec, cache_dtype=self.kv_cache_dtype)

    @property
    def compiled(self) -> bool:
        return self.compile and self.compile_error is None

    def _warmup_cache(self) -> tuple[KVCache, list[int]]:
        """A private cache with one sequence's worth of blocks for warm-up calls."""
        blocks = -(-_WARMUP_PROMPT // _WARMUP_BLOCK) + 1
        return KVCache(self.kv_spec, blocks, _WARMUP_BLOCK), list(range(blocks))

    def _run_every_batch_size(self) -> None:
        runner = self.runner
        cache, table = self._warmup_cache()
        prompt = [0] * min(_WARMUP_PROMPT, self.max_seq_len - 1)
        runner.prefill(cache, table, prompt)
        half = len(prompt) // 2
        runner.prefill(cache, table, prompt, start=half, chunk=half)  # after a cached prefix
        for batch in range(1, self.max_num_seqs + 1):
            # Every row writes the same slot: harmless, the cache is scratch.
            tokens = torch.zeros(batch, dtype=torch.long, device=runner.device)
            runner.decode(cache, tokens, [len(prompt)] * batch, [table] * batch)

    def _compile(self) -> None:
        """Compile the decode step on warm-up calls that cover batch 1 (its own
        graph), larger batches and two attention spans (dynamic dimensions).

        Any failure (no C compiler, an op inductor cannot lower) leaves the
        runner eager: a slower server, never a dead one.
        """
        start = time.perf_counter()
        runner = self.runner
        cache, table = self._warmup_cache()
        spans = sorted({2, min(_WARMUP_PROMPT, self.max_seq_len - 1)})
        try:
            runner.compile_decode()
            for batch in sorted({1, min(2, self.max_num_seqs), self.max_num_seqs}):
                for span in spans:
                    tokens = torch.zeros(batch, dtype=torch.long, device=runner.device)
                    runner.decode(cache, tokens, [span - 1] * batch, [table] * batch)
        except Exception as exc:  # compilation failing must not take the server down
            runner.eager_decode()
            self.compile_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning(
                "torch.compile of %s failed, decoding eagerly: %s", self.loaded.model_id,
                self.compile_error,
            )
        self.compile_s = time.perf_counter() - start

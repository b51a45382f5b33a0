"""The `compile` setting: which devices compile, the compiled decode step gives
the eager step's greedy text, and a failed compilation serves eagerly."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._inductor.config as inductor_config

from server.engine import Engine
from server.engine.served_model import should_compile
from tests.engine.conftest import make_loaded
from tests.engine.streams import request, run, run_all

PROMPTS = ["Once upon a time", "def main():"]


def test_auto_compiles_on_cuda_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not should_compile("auto", cpu)
    assert should_compile("auto", cuda)
    assert should_compile("on", cpu)
    assert not should_compile("off", cuda)
    with pytest.raises(ValueError, match="compile must be one of"):
        should_compile("sometimes", cpu)  # type: ignore[arg-type]


def test_eager_engine_reports_no_compilation() -> None:
    engine = Engine(make_loaded(), max_num_seqs=2, max_model_len=128, num_threads=1)
    engine.start()
    engine.shutdown()
    extra = engine.stats().extra
    assert extra["decode_compiled"] == 0.0
    assert extra["compile_seconds"] == 0.0


def _greedy(engine: Engine) -> tuple[list[list[int]], list[list[int]]]:
    tokenizer = engine.loaded.tokenizer
    reqs = [request(tokenizer.encode(p), max_tokens=12, ignore_eos=True) for p in PROMPTS]
    alone = [run(engine, r).token_ids for r in reqs]
    batched = [r.token_ids for r in run_all(engine, reqs)]
    return alone, batched


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_text() -> None:
    """float32 tiny model: inductor's fused kernels round differently from the
    eager ops, but not enough to change a greedy token."""
    loaded = make_loaded()
    eager = Engine(loaded, max_num_seqs=2, max_model_len=256, num_threads=1)
    eager.start()
    try:
        want_alone, want_batched = _greedy(eager)
    finally:
        eager.shutdown()
    compiled = Engine(loaded, max_num_seqs=2, max_model_len=256, num_threads=1, compile="on")
    compiled.start()
    try:
        extra = compiled.stats().extra
        assert extra["decode_compiled"] == 1.0
        assert 0 < extra["compile_seconds"] <= extra["warmup_seconds"]
        alone, batched = _greedy(compiled)
    finally:
        compiled.shutdown()
    assert alone == want_alone
    assert batched == want_batched == want_alone


@pytest.mark.slow
def test_failed_compilation_serves_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    """No C++ compiler for inductor: a warning, then the eager step serves."""
    loaded = make_loaded()
    engine = Engine(loaded, max_num_seqs=2, max_model_len=128, num_threads=1, compile="on")
    # Graphs compiled earlier in this process would be reused without calling
    # the compiler at all; forget them so this start really has to compile.
    torch._dynamo.reset()
    with (
        inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}),
        caplog.at_level(logging.WARNING, logger="quantserve.engine"),
    ):
        engine.start()
    try:
        assert engine.stats().extra["decode_compiled"] == 0.0
        assert any("torch.compile" in r.getMessage() for r in caplog.records)
        result = run(engine, request(loaded.tokenizer.encode("abc"), max_tokens=5,
                                     ignore_eos=True))
    finally:
        engine.shutdown()
    assert result.finish.completion_tokens == 5

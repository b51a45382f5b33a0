"""The `compile` setting: which devices compile, the compiled decode step gives
the eager step's greedy text, and a failed compilation serves eagerly."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch._inductor.config as inductor_config

from server.engine import Engine
from server.engine.llama_runner import LlamaRunner, buckets
from server.engine.served_model import should_compile
from tests.engine.conftest import VOCAB, make_loaded
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
    engine = Engine(make_loaded(), max_batch=2, max_batch_tokens=128, num_threads=1)
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
    eager = Engine(loaded, max_batch=2, max_batch_tokens=256, num_threads=1)
    eager.start()
    try:
        want_alone, want_batched = _greedy(eager)
    finally:
        eager.shutdown()
    compiled = Engine(loaded, max_batch=2, max_batch_tokens=256, num_threads=1, compile="on")
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
    engine = Engine(loaded, max_batch=2, max_batch_tokens=128, num_threads=1, compile="on")
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


def test_shape_buckets_are_powers_of_two_up_to_the_limit() -> None:
    assert buckets(8, 1) == (1, 2, 4, 8)
    assert buckets(6, 1) == (1, 2, 4, 6)
    assert buckets(4096, 64) == (64, 128, 256, 512, 1024, 2048, 4096)
    assert buckets(32, 64) == (32,)


def test_decode_padded_to_graph_shapes_gives_the_same_logits() -> None:
    """What CUDA-graph decoding runs, on the eager step: 3 sequences padded to a
    batch of 4 and a span of 64 give the logits of the unpadded step."""
    plain = LlamaRunner(make_loaded().model, max_batch=4, max_seq_len=128)
    padded = LlamaRunner(make_loaded().model, max_batch=4, max_seq_len=128)
    padded.shape_buckets = (buckets(4, 1), buckets(128, 64))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    for runner in (plain, padded):
        for slot, prompt in enumerate(prompts):
            runner.prefill(slot, prompt)
    tokens = torch.tensor([1, 2, 3])
    positions = torch.tensor([len(p) for p in prompts])
    for _ in range(3):
        want, got = plain.decode(tokens, positions), padded.decode(tokens, positions)
        assert got.shape == want.shape == (3, VOCAB)
        torch.testing.assert_close(got, want)
        tokens, positions = want.argmax(-1), positions + 1


def test_graph_mode_steps_all_run_on_one_thread() -> None:
    """CUDA graphs live in thread-local state: steps from the warm-up thread and
    from the engine's worker must reach the same thread (checked here with the
    eager step standing in for the compiled one)."""
    runner = LlamaRunner(make_loaded().model, max_batch=2, max_seq_len=64)
    reference = LlamaRunner(make_loaded().model, max_batch=2, max_seq_len=64)
    runner.shape_buckets = (buckets(2, 1), buckets(64, 64))
    runner.cuda_graphs = True
    ran_on: list[str] = []
    step = runner._step

    def recording(*args: torch.Tensor) -> torch.Tensor:
        ran_on.append(threading.current_thread().name)
        return step(*args)

    runner._step = recording
    for each in (runner, reference):
        each.prefill(0, [5, 6, 7])
    tokens, positions = torch.tensor([1]), torch.tensor([3])
    results: list[torch.Tensor] = [runner.decode(tokens, positions)]
    other = threading.Thread(target=lambda: results.append(runner.decode(tokens, positions + 1)))
    other.start()
    other.join()
    assert len(set(ran_on)) == 1 and ran_on[0].startswith("quantserve-cuda-graphs")
    torch.testing.assert_close(results[0], reference.decode(tokens, positions))
    torch.testing.assert_close(results[1], reference.decode(tokens, positions + 1))

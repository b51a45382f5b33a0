"""The engine's contract on a tiny random Llama: outputs, stops, sampling,
logprobs, timeouts, cancellation, overload, shutdown and model swap."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch

from quantizers.loading import LoadedModel
from server.engine import Engine, EngineOverloaded, EngineShuttingDown, Finish
from tests.engine.conftest import make_loaded
from tests.engine.streams import collect, reference_greedy, request, run, run_all

PROMPT = "The quick brown fox"


def prompt_ids(loaded: LoadedModel, text: str = PROMPT) -> list[int]:
    return loaded.tokenizer.encode(text)


def test_greedy_matches_transformers_forward(engine: Engine, loaded: LoadedModel) -> None:
    ids = prompt_ids(loaded)
    result = run(engine, request(ids, max_tokens=24, ignore_eos=True))
    assert result.token_ids == reference_greedy(loaded.model, ids, 24)
    assert result.text == loaded.tokenizer.decode(result.token_ids)
    finish = result.finish
    assert (finish.reason, finish.prompt_tokens) == ("length", len(ids))
    assert finish.completion_tokens == 24
    assert finish.model_id == "tiny-0" and finish.variant == "float"
    timings = finish.timings
    assert 0 <= timings.queue_s <= timings.ttft_s <= timings.e2e_s
    assert len(timings.inter_token_s) == 23


def test_stop_string_ends_generation_and_is_not_returned(
    engine: Engine, loaded: LoadedModel
) -> None:
    ids = prompt_ids(loaded)
    full = run(engine, request(ids, max_tokens=24, ignore_eos=True)).text
    stop = full[5:7]
    result = run(engine, request(ids, max_tokens=24, ignore_eos=True, stop=(stop,)))
    assert result.finish.reason == "stop"
    assert result.text == full[: full.index(stop)]


def test_stop_token_id_ends_generation(engine: Engine, loaded: LoadedModel) -> None:
    ids = prompt_ids(loaded)
    tokens = run(engine, request(ids, max_tokens=24, ignore_eos=True)).token_ids
    result = run(engine, request(ids, max_tokens=24, stop_token_ids=(tokens[3],)))
    first = tokens.index(tokens[3])
    assert result.finish.reason == "stop"
    assert result.token_ids == tokens[:first]
    assert result.finish.completion_tokens == first + 1


def test_seed_reproduces_sampled_text(engine: Engine, loaded: LoadedModel) -> None:
    ids = prompt_ids(loaded)

    def sampled(seed: int) -> list[int]:
        req = request(ids, max_tokens=20, temperature=1.0, seed=seed, ignore_eos=True)
        return run(engine, req).token_ids

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


def test_logprobs_match_log_softmax(engine: Engine, loaded: LoadedModel) -> None:
    ids = prompt_ids(loaded)
    result = run(engine, request(ids, max_tokens=4, ignore_eos=True, logprobs=3))
    entries = [lp for d in result.deltas for lp in d.logprobs]
    assert [e.token_id for e in entries] == result.token_ids
    context = list(ids)
    for entry in entries:
        with torch.inference_mode():
            logits = loaded.model(torch.tensor([context])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        assert math.isclose(entry.logprob, float(expected[entry.token_id]), abs_tol=1e-4)
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.top[-1][1]
        assert entry.token == loaded.tokenizer.decode([entry.token_id])
        context.append(entry.token_id)


def test_prompt_logprobs(engine: Engine, loaded: LoadedModel) -> None:
    ids = prompt_ids(loaded)
    result = run(engine, request(ids, max_tokens=1, prompt_logprobs=True, logprobs=0))
    scored = result.finish.prompt_logprobs
    assert scored is not None and len(scored) == len(ids) and scored[0] is None
    with torch.inference_mode():
        expected = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)
    for position in range(1, len(ids)):
        assert math.isclose(
            scored[position].logprob, float(expected[position - 1, ids[position]]), abs_tol=1e-4
        )


def test_timeout_finishes_with_timeout(engine: Engine, loaded: LoadedModel) -> None:
    result = run(
        engine, request(prompt_ids(loaded), max_tokens=400, ignore_eos=True, timeout_s=0.0)
    )
    assert result.finish.reason == "timeout"


def test_prompt_too_long_is_an_error(engine: Engine) -> None:
    result = run(engine, request([1] * 600))
    assert result.finish.reason == "error" and "600" in result.finish.error


def test_consumer_stopping_cancels_and_frees_the_slot(
    engine: Engine, loaded: LoadedModel
) -> None:
    async def main() -> None:
        stream = engine.generate(request(prompt_ids(loaded), max_tokens=400, ignore_eos=True))
        await stream.__anext__()
        assert engine.stats().running == 1
        await stream.aclose()
        for _ in range(200):
            if engine.stats().running == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("slot not freed")

    asyncio.run(main())
    finished_before = engine.stats().total_finished
    assert run(engine, request(prompt_ids(loaded), max_tokens=2)).finish.reason == "length"
    assert engine.stats().total_finished == finished_before + 1


def test_full_queue_raises_overloaded(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_num_seqs=1, max_model_len=512, max_queue=2, num_threads=1)
    engine.start()
    try:
        async def main() -> None:
            long = request(prompt_ids(loaded), max_tokens=480, ignore_eos=True)
            tasks = [asyncio.ensure_future(collect(engine, long))]
            while engine.stats().running < 1:
                await asyncio.sleep(0.001)
            tasks += [asyncio.ensure_future(collect(engine, long)) for _ in range(2)]
            while engine.stats().waiting < 2:
                await asyncio.sleep(0.001)
            with pytest.raises(EngineOverloaded) as caught:
                await engine.generate(long).__anext__()
            assert caught.value.retry_after_s > 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
    finally:
        engine.shutdown(drain_timeout_s=5)


def test_shutdown_drains_then_refuses(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_num_seqs=2, max_model_len=512, num_threads=1)
    engine.start()
    results: list[Finish] = []

    def client() -> None:
        results.append(run(engine, request(prompt_ids(loaded), max_tokens=30)).finish)

    thread = threading.Thread(target=client)
    thread.start()
    while engine.stats().running == 0 and not results:
        pass
    engine.shutdown(drain_timeout_s=10)
    thread.join()
    assert results[0].reason == "length"
    with pytest.raises(EngineShuttingDown):
        run(engine, request(prompt_ids(loaded)))


def test_shutdown_timeout_cancels_running(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_num_seqs=2, max_model_len=512, num_threads=1)
    engine.start()
    results: list[Finish] = []

    def client() -> None:
        req = request(prompt_ids(loaded), max_tokens=480, ignore_eos=True)
        results.append(run(engine, req).finish)

    thread = threading.Thread(target=client)
    thread.start()
    while engine.stats().running == 0:
        pass
    engine.shutdown(drain_timeout_s=0.0)
    thread.join()
    assert results[0].reason == "cancelled"


def test_swap_model_keeps_running_requests_on_their_model(
    engine: Engine, loaded: LoadedModel
) -> None:
    other = make_loaded(seed=1)
    ids = prompt_ids(loaded)

    async def main() -> tuple:
        old = asyncio.ensure_future(collect(engine, request(ids, max_tokens=60, ignore_eos=True)))
        while engine.stats().running == 0:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(engine.swap_model, other)
        new = await collect(engine, request(ids, max_tokens=10, ignore_eos=True))
        return await old, new

    old, new = asyncio.run(main())
    assert engine.loaded is other
    assert old.finish.model_id == "tiny-0"
    assert old.token_ids == reference_greedy(loaded.model, ids, 60)
    assert new.finish.model_id == "tiny-1"
    assert new.token_ids == reference_greedy(other.model, ids, 10)


def test_bfloat16_model_serves(loaded: LoadedModel) -> None:
    bf16 = make_loaded(dtype=torch.bfloat16)
    engine = Engine(bf16, max_num_seqs=2, max_model_len=256, num_threads=1)
    engine.start()
    try:
        ids = prompt_ids(bf16)
        results = run_all(engine, [request(ids, max_tokens=8, ignore_eos=True)] * 2)
    finally:
        engine.shutdown()
    assert all(r.finish.completion_tokens == 8 for r in results)
    assert results[0].token_ids == results[1].token_ids

"""Continuous batching: results do not depend on what else is in the batch,
streams interleave without losing or repeating tokens, slots are bounded."""

from __future__ import annotations

import asyncio

import pytest

from quantizers.loading import LoadedModel
from server.engine import Engine, Finish, GenerationRequest, TokenDelta
from server.engine.worker import CacheConfig
from tests.engine.paged import block_bytes
from tests.engine.streams import Result, collect, reference_greedy, request, run, run_all

PROMPTS = [
    "Once upon a time",
    "def main():",
    "Héllo wörld 🙂",
    "1, 2, 3,",
    "The capital of France is",
    "SELECT * FROM",
    "a",
    "Lorem ipsum dolor sit amet, consectetur",
]


def test_greedy_alone_equals_batched(engine: Engine, loaded: LoadedModel) -> None:
    requests = [
        request(loaded.tokenizer.encode(p), f"r{i}", max_tokens=12 + 3 * i, ignore_eos=True)
        for i, p in enumerate(PROMPTS)
    ]
    alone = [run(engine, r).token_ids for r in requests]
    batched = run_all(engine, requests)
    assert [r.token_ids for r in batched] == alone
    assert alone[0] == reference_greedy(loaded.model, requests[0].prompt_ids, 12)
    assert engine.stats().extra["decode_steps_total"] > 0


def test_seeded_sampling_is_independent_of_the_batch(engine: Engine, loaded: LoadedModel) -> None:
    sampled = request(
        loaded.tokenizer.encode(PROMPTS[0]), max_tokens=20, temperature=0.9, top_p=0.9,
        seed=11, ignore_eos=True,
    )
    others = [request(loaded.tokenizer.encode(p), max_tokens=25, ignore_eos=True) for p in PROMPTS]
    alone = run(engine, sampled).token_ids
    together = run_all(engine, [*others[:3], sampled, *others[3:]])
    assert together[3].token_ids == alone


def test_eight_streams_interleave_in_order(engine: Engine, loaded: LoadedModel) -> None:
    requests = [
        request(loaded.tokenizer.encode(p), f"s{i}", max_tokens=30, ignore_eos=True)
        for i, p in enumerate(PROMPTS)
    ]
    expected = [run(engine, r).token_ids for r in requests]
    arrivals: list[tuple[str, tuple[int, ...]]] = []
    finishes: dict[str, Finish] = {}

    async def consume(index: int) -> None:
        async for item in engine.generate(requests[index]):
            if isinstance(item, TokenDelta):
                arrivals.append((f"s{index}", item.token_ids))
            else:
                finishes[f"s{index}"] = item

    async def main() -> None:
        await asyncio.gather(*(consume(i) for i in range(8)))

    asyncio.run(main())
    for index, tokens in enumerate(expected):
        got = [t for rid, ids in arrivals if rid == f"s{index}" for t in ids]
        assert got == tokens
        assert finishes[f"s{index}"].completion_tokens == 30
    owners = [rid for rid, _ in arrivals]
    all_started = max(owners.index(f"s{i}") for i in range(8))
    assert len(set(owners[all_started : all_started + 16])) > 1, "streams did not interleave"


def test_batch_is_bounded_and_excess_waits(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_num_seqs=2, max_model_len=512, num_threads=1)
    engine.start()
    peak = 0

    async def main() -> list:
        nonlocal peak
        tasks = [
            asyncio.ensure_future(
                collect(engine, request(loaded.tokenizer.encode(p), max_tokens=40, ignore_eos=True))
            )
            for p in PROMPTS[:5]
        ]
        while not all(t.done() for t in tasks):
            peak = max(peak, engine.stats().running)
            await asyncio.sleep(0)
        return [t.result() for t in tasks]

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert peak == 2
    assert all(r.finish.completion_tokens == 40 for r in results)
    assert max(r.finish.timings.queue_s for r in results) > min(
        r.finish.timings.queue_s for r in results
    )


def _small_pool(
    loaded: LoadedModel, blocks: int, *, prefix_caching: bool = True,
    kv_cache_dtype: str = "auto", **limits: int,
) -> Engine:
    cache = CacheConfig(
        kv_cache_bytes=block_bytes(loaded, 16, kv_cache_dtype) * blocks, block_size=16,
        prefix_caching=prefix_caching, kv_cache_dtype=kv_cache_dtype,
    )
    engine = Engine(loaded, cache=cache, num_threads=1, **limits)
    engine.start()
    return engine


def _peak_running(engine: Engine, requests: list[GenerationRequest]) -> tuple[int, list[Result]]:
    """Run `requests` together; the most sequences ever running at once (seen by
    the engine thread after each admission, so no step is missed)."""
    scheduler = engine._scheduler
    admit = scheduler.admit
    peak = 0

    def counted() -> list:
        nonlocal peak
        admitted = admit()
        peak = max(peak, len(scheduler.running))
        return admitted

    scheduler.admit = counted  # type: ignore[method-assign]
    try:
        results = run_all(engine, requests)
    finally:
        scheduler.admit = admit  # type: ignore[method-assign]
    return peak, results


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_free_blocks_limit_admission(loaded: LoadedModel, kv_cache_dtype: str) -> None:
    """Sequences of 40 + 8 tokens take 3 blocks of 16 each: a pool of 8 admits two
    at a time; the others wait (no error) and finish as they would alone."""
    engine = _small_pool(loaded, 8, prefix_caching=False, max_num_seqs=8, max_model_len=120,
                         kv_cache_dtype=kv_cache_dtype)
    ids = [(7 * i) % 200 + 3 for i in range(40)]
    requests = [request([v + k for v in ids], max_tokens=8, ignore_eos=True) for k in range(4)]
    try:
        alone = [run(engine, r).token_ids for r in requests]
        peak, results = _peak_running(engine, requests)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert peak == 2
    assert [r.token_ids for r in results] == alone
    assert stats.kv_blocks_total == 8 and stats.kv_blocks_used == 0


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_a_sequence_that_cannot_grow_preempts_the_newest(
    loaded: LoadedModel, kv_cache_dtype: str
) -> None:
    """Four 5-token prompts are admitted at once (one block each) but each grows
    to 55 tokens (4 blocks) in a pool of 8: the newest are preempted, recomputed
    later, and every output is what it is alone. In int8 a recomputation's
    prefill attends over its own fresh keys where the first run read them back
    from int8, so equality there also says those errors stay below this model's
    margins between its top tokens."""
    engine = _small_pool(loaded, 8, max_num_seqs=8, max_model_len=120,
                         kv_cache_dtype=kv_cache_dtype)
    prompts = [loaded.tokenizer.encode(p) for p in ("hello", "one two", "abc", "x y z")]
    requests = [request(p, max_tokens=50, ignore_eos=True) for p in prompts]
    try:
        alone = [run(engine, r).token_ids for r in requests]
        assert engine.stats().preemptions == 0
        peak, results = _peak_running(engine, requests)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert peak == 4
    assert stats.preemptions > 0
    assert [r.token_ids for r in results] == alone
    assert all(r.finish.completion_tokens == 50 for r in results)

"""Continuous batching: results do not depend on what else is in the batch,
streams interleave without losing or repeating tokens, slots are bounded."""

from __future__ import annotations

import asyncio

from quantizers.loading import LoadedModel
from server.engine import Engine, Finish, TokenDelta
from tests.engine.streams import collect, reference_greedy, request, run, run_all

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
    engine = Engine(loaded, max_batch=2, max_batch_tokens=512, num_threads=1)
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


def test_token_budget_limits_admission(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_batch=8, max_batch_tokens=120, num_threads=1)
    engine.start()
    peak = 0

    async def main() -> None:
        nonlocal peak
        ids = loaded.tokenizer.encode("hello")
        tasks = [
            asyncio.ensure_future(collect(engine, request(ids, max_tokens=50, ignore_eos=True)))
            for _ in range(4)
        ]
        while not all(t.done() for t in tasks):
            peak = max(peak, engine.stats().running)
            await asyncio.sleep(0)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert peak == 2  # each needs 5 + 50 cache positions: two fit in 120

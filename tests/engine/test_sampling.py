"""Token choice: greedy, temperature, top_p, seeds and logprobs."""

from __future__ import annotations

import math

import torch

from server.engine.sampling import (
    SeededGenerator,
    choose_tokens,
    make_generator,
    prompt_logprobs,
)
from server.engine.types import SamplingParams


def logits_rows(rows: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(7)) * 3


def test_greedy_picks_argmax_and_reports_logprobs() -> None:
    logits = logits_rows()
    params = [SamplingParams(max_tokens=1, temperature=0, logprobs=3)] * 3
    choices = choose_tokens(logits, params, [make_generator(0)] * 3)
    expected = torch.log_softmax(logits, dim=-1)
    for row, choice in enumerate(choices):
        assert choice.token_id == int(logits[row].argmax())
        assert math.isclose(choice.logprob, float(expected[row].max()), rel_tol=1e-6)
        assert [t for t, _ in choice.top] == expected[row].topk(3).indices.tolist()


def test_same_seed_same_draws_different_seed_differs() -> None:
    logits = torch.zeros(1, 1000)
    params = [SamplingParams(max_tokens=1, temperature=1.0)]

    def draws(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [choose_tokens(logits, params, [generator])[0].token_id for _ in range(20)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0, -10.0]])
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)]
    generator = make_generator(1)
    picks = {choose_tokens(logits, params, [generator])[0].token_id for _ in range(200)}
    assert picks == {0}
    wide = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.99)]
    picks = {choose_tokens(logits, wide, [generator])[0].token_id for _ in range(200)}
    assert picks == {0, 1}


def test_rows_keep_their_own_parameters() -> None:
    logits = logits_rows(2)
    params = [
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=1, temperature=1.0, logprobs=None),
    ]
    choices = choose_tokens(logits, params, [make_generator(0), make_generator(0)])
    assert choices[0].token_id == int(logits[0].argmax())
    assert choices[0].logprob is None and choices[1].logprob is None


def test_prompt_logprobs_score_each_next_token() -> None:
    logits = logits_rows(4, 10)
    prompt = [1, 2, 3, 4]
    scored = prompt_logprobs(logits, prompt, top_k=2)
    assert scored[0] is None
    expected = torch.log_softmax(logits, dim=-1)
    for position in range(1, 4):
        token, logprob, top = scored[position]
        assert token == prompt[position]
        assert math.isclose(logprob, float(expected[position - 1, token]), rel_tol=1e-6)
        assert len(top) == 2


def test_sampled_rows_draw_from_a_generator_on_the_logits_device() -> None:
    asked: list[torch.device] = []

    class Recording(SeededGenerator):
        def on(self, device: torch.device) -> torch.Generator:
            asked.append(device)
            return super().on(device)

    logits = torch.randn(2, 50)
    params = [SamplingParams(max_tokens=1, temperature=t) for t in (0.0, 1.0)]
    choose_tokens(logits, params, [Recording(0), Recording(0)])
    assert asked == [logits.device]  # only the sampled row, and on the logits' device

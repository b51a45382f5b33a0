"""Feedback refinement: never worse than its start, errors per round reported,
and the refined grids run on the same kernels."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaForCausalLM

from quantizers.errors import ConfigError
from quantizers.methods.grid_refinement import GroupGrid
from quantizers.methods.sensitivity import measured_kl
from quantizers.primitives import quantize_per_group_asymmetric
from quantizers.registry import quantize
from quantizers.runtime.int4 import Int4WeightOnlyLinear

from .conftest import tiny_llama_config

INT4_START = {"method": "int4", "config": {"group_size": 32}}


def fresh_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def calibration(count: int = 12, length: int = 48) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (1, length), generator=gen) for _ in range(count)]


def kl_on(model: LlamaForCausalLM, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return measured_kl(reference, model(ids).logits)


def test_refinement_lowers_the_weighted_error_and_runs_on_the_int4_kernel() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=gen) * 0.05
    importance = torch.rand(64, generator=gen) ** 4 * 10
    q, scale, zero = quantize_per_group_asymmetric(weight, 4, 32)
    grid = GroupGrid(q, scale, (8 - zero) * scale, 32)
    errors = [grid.weighted_error(weight, importance)]
    for _ in range(3):
        grid = grid.refined(weight, importance)
        errors.append(grid.weighted_error(weight, importance))
    assert errors[1] < 0.95 * errors[0]
    assert all(later <= earlier * 1.001 for earlier, later in itertools.pairwise(errors))

    module = Int4WeightOnlyLinear.from_quantized(grid.codes, grid.scale, grid.zero, 32)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    expected = x.float() @ grid.dequantized().T
    torch.testing.assert_close(module(x).float(), expected, atol=3e-2, rtol=3e-2)


def test_an_unpadded_weight_refines_as_its_zero_padded_copy() -> None:
    """Feedback keeps layers' float weights unpadded (a padded copy of every
    layer would be a second float model); the grid pads them per call."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 40, generator=gen) * 0.05
    padded = torch.nn.functional.pad(weight, (0, 24))
    importance = torch.cat([torch.rand(40, generator=gen) + 0.1, torch.zeros(24)])
    q, scale, zero = quantize_per_group_asymmetric(padded, 4, 32)
    grid = GroupGrid(q, scale, (8 - zero) * scale, 32)

    from_unpadded, from_padded = grid.refined(weight, importance), grid.refined(padded, importance)
    assert torch.equal(from_unpadded.codes, from_padded.codes)
    assert torch.equal(from_unpadded.scale, from_padded.scale)
    assert from_unpadded.weighted_error(weight, importance) == from_padded.weighted_error(
        padded, importance
    )
    assert from_unpadded.weighted_error(weight, importance) < grid.weighted_error(
        weight, importance
    )


def test_feedback_is_never_worse_than_its_start_and_reports_every_round() -> None:
    batches = calibration()
    kl_ids = torch.cat(batches[:4])
    with torch.no_grad():
        reference = fresh_model()(kl_ids).logits

    start = fresh_model()
    quantize(start, "int4", {"group_size": 32})
    refined = fresh_model()
    report = quantize(refined, "feedback", {"start": INT4_START, "rounds": 3}, calibration=batches)
    history = report.extra["feedback"]["rounds"]
    assert history[0]["round"] == 0 and 1 < len(history) <= 4
    assert history[0]["kl"] == pytest.approx(kl_on(start, reference, kl_ids), rel=0.05)
    # Each round's Lloyd step lowers the weighted layer error.
    errors = [h["layer_error"] for h in history]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert kl_on(refined, reference, kl_ids) <= kl_on(start, reference, kl_ids)
    best = report.extra["feedback"]["best_round"]
    assert history[best]["kl"] == min(h["kl"] for h in history)
    # The same layers and bytes as int4 RTN: blocks in int4, the tied head int8.
    kinds = {name: layer["kind"] for name, layer in report.layers.items()}
    assert kinds.pop("lm_head") == "Int8WeightOnlyLinear"
    assert set(kinds.values()) == {"Int4WeightOnlyLinear"}
    rtn = quantize(fresh_model(), "int4", {"group_size": 32})
    assert sorted(report.layers) == sorted(rtn.layers)
    assert report.weight_bytes_after == rtn.weight_bytes_after


def test_progress_moves_with_the_rounds() -> None:
    seen: list[tuple[int, int]] = []
    report = quantize(
        fresh_model(),
        "feedback",
        {"start": INT4_START, "rounds": 3},
        calibration=calibration(),
        progress=lambda done, total: seen.append((done, total)),
    )
    layers = len(report.layers)
    measured = len(report.extra["feedback"]["rounds"])
    rounds = [(done * layers // 4, layers) for done in range(1, measured + 1)]
    assert seen[:measured] == rounds
    assert seen[measured:] == [(i + 1, layers) for i in range(layers)]


def test_feedback_improves_held_out_logits_over_rtn(tiny_tokens: torch.Tensor) -> None:
    with torch.no_grad():
        reference = fresh_model()(tiny_tokens).logits
    start = fresh_model()
    quantize(start, "int4", {"group_size": 32})
    refined = fresh_model()
    quantize(refined, "feedback", {"start": INT4_START}, calibration=calibration(24, 48))
    assert kl_on(refined, reference, tiny_tokens) < kl_on(start, reference, tiny_tokens)


def test_feedback_refines_an_int8_start() -> None:
    report = quantize(
        fresh_model(),
        "feedback",
        {"start": {"method": "int8"}, "rounds": 2},
        calibration=calibration(),
    )
    assert {layer["kind"] for layer in report.layers.values()} == {"Int8WeightOnlyLinear"}
    assert report.layers["lm_head"]["tied_embedding"] is True
    history = report.extra["feedback"]["rounds"]
    assert history[1]["layer_error"] < history[0]["layer_error"]


def test_zero_rounds_keeps_the_start() -> None:
    report = quantize(
        fresh_model(), "feedback", {"start": INT4_START, "rounds": 0}, calibration=calibration()
    )
    assert [h["round"] for h in report.extra["feedback"]["rounds"]] == [0]


@pytest.mark.parametrize(
    ("config", "param"),
    [
        ({"start": {"method": "feedback"}}, "start"),
        ({"start": {"config": {}}}, "start"),
        ({"rounds": -1}, "rounds"),
        ({"kl_samples": 0}, "kl_samples"),
    ],
)
def test_invalid_config_names_the_field(config: dict[str, object], param: str) -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(fresh_model(), "feedback", config, calibration=calibration())
    assert caught.value.param == param


def test_unknown_start_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(
            fresh_model(), "feedback", {"start": {"method": "nope"}}, calibration=calibration()
        )
    assert caught.value.param == "start"

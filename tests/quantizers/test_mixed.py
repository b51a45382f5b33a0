"""Mixed precision: budgets are met, sensitive layers get the bits, the plan round-trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from quantizers.errors import ConfigError
from quantizers.methods.bit_allocation import Allocator, BudgetUnreachable, LayerOption
from quantizers.methods.column_grid import rtn_weight
from quantizers.methods.sensitivity import (
    SensitivityProbe,
    measured_kl,
    measured_sensitivities,
)
from quantizers.registry import quantize
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from quantizers.serialization import build_from_state, quantized_state

from .conftest import tiny_llama_config

SENSITIVE = "model.layers.1.mlp.down_proj"


def fresh_model(outlier: bool = False) -> LlamaForCausalLM:
    """The tiny Llama; with `outlier`, one layer gets an outlier input column that
    ruins its int4 groups (the situation mixed precision exists for)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    if outlier:
        with torch.no_grad():
            model.get_submodule(SENSITIVE).weight[:, 3] *= 40.0
    return model


def calibration(count: int = 8, length: int = 48) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (1, length), generator=gen) for _ in range(count)]


def stored_bytes(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def linear_names(model: nn.Module) -> list[str]:
    """The layers the knapsack chooses for: every linear but the tied head."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]


def test_measured_sensitivity_is_the_kl_of_quantising_that_layer_alone() -> None:
    model = fresh_model(outlier=True)
    batches = calibration(4, 32)
    name = "model.layers.0.self_attn.o_proj"
    weight = model.get_submodule(name).weight.detach().float()
    int4 = rtn_weight(weight, 4, 32)
    scores = measured_sensitivities(
        model, batches, {name: lambda bits: rtn_weight(weight, bits, 32)}, {name: [4, 8]}
    )

    ids = torch.cat(batches)
    with torch.no_grad():
        reference = model(ids).logits
        model.get_submodule(name).weight.data = int4
        direct = measured_kl(reference, model(ids).logits)
        model.get_submodule(name).weight.data = weight
    assert scores[name][4] == pytest.approx(direct, rel=1e-3)
    assert scores[name][4] > scores[name][8] > 0
    # The model is left exactly as it was.
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)


def test_a_layer_made_worse_scores_higher_and_an_unchanged_one_zero() -> None:
    model = fresh_model()
    batches = calibration(4, 32)
    name = "model.layers.1.mlp.up_proj"
    weight = model.get_submodule(name).weight.detach().float()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.01
    probe = SensitivityProbe(model, batches)
    assert probe.kl_with(name, weight) == 0.0
    mild, worse = probe.kl_with(name, weight + noise), probe.kl_with(name, weight + 4 * noise)
    assert worse > 4 * mild > 0


def test_sensitivities_report_progress_layer_by_layer() -> None:
    model = fresh_model()
    names = linear_names(model)
    seen: list[tuple[int, int]] = []
    report = quantize(
        model,
        "mixed",
        {"target_bits_per_weight": 6.0, "group_size": 32},
        calibration=calibration(),
        progress=lambda done, total: seen.append((done, total)),
    )
    measuring = seen[: len(names)]
    assert measuring == [(i + 1, len(names)) for i in range(len(names))]
    # Then the swaps, one per layer (the tied head too).
    assert seen[len(names) :] == [(i + 1, len(report.layers)) for i in range(len(report.layers))]


def test_memory_budget_is_met_and_sensitive_layers_get_more_bits() -> None:
    model = fresh_model(outlier=True)
    report = quantize(
        model, "mixed", {"target_bits_per_weight": 6.0, "group_size": 32}, calibration=calibration()
    )
    plan = report.extra["mixed"]["plan"]
    # The tied head is int8 codes shared with the embedding, outside the budget
    # (as int4 stores it); the budget counts the other linears as stored.
    assert plan["lm_head"] == 8 and report.layers["lm_head"]["tied_embedding"] is True
    knapsack = {name: bits for name, bits in plan.items() if name != "lm_head"}
    assert sorted(knapsack) == sorted(linear_names(fresh_model()))
    stored = sum(stored_bytes(model, name) for name in knapsack)
    weights = sum(
        model.get_submodule(name).in_features * model.get_submodule(name).out_features
        for name in knapsack
    )
    assert 8 * stored / weights == report.extra["mixed"]["planned_bits_per_weight"] <= 6.0
    assert set(knapsack.values()) > {4}
    int4_loss = {n: float(s["4"]) for n, s in report.extra["mixed"]["sensitivity"].items()}
    wider = [int4_loss[n] for n, bits in knapsack.items() if bits > 4]
    narrow = [int4_loss[n] for n, bits in knapsack.items() if bits == 4]
    assert sum(wider) / len(wider) > 2 * sum(narrow) / len(narrow)
    for name, bits in plan.items():
        kind = {4: Int4WeightOnlyLinear, 8: Int8WeightOnlyLinear, 16: nn.Linear}[bits]
        assert type(model.get_submodule(name)) is kind
    sensitivity = report.extra["mixed"]["sensitivity"][SENSITIVE]
    assert sensitivity["4"] > sensitivity["8"] > 0


def test_byte_budget_is_met_exactly_as_reported() -> None:
    model = fresh_model()
    budget = 120_000
    report = quantize(
        model, "mixed", {"max_weight_bytes": budget, "group_size": 32}, calibration=calibration()
    )
    stored = sum(stored_bytes(model, name) for name in report.layers if name != "lm_head")
    assert stored == report.extra["mixed"]["planned_bytes"] <= budget


def test_mixed_beats_the_line_between_int4_and_int8(tiny_tokens: torch.Tensor) -> None:
    """At a budget between uniform int4 and int8, mixed's KL lies below their chord."""
    reference_model = fresh_model(outlier=True)
    with torch.no_grad():
        reference = reference_model(tiny_tokens).logits
    points = {}
    for method, config in (
        ("int4", {"group_size": 32}),
        ("int8", {}),
        ("mixed", {"target_bits_per_weight": 6.0, "group_size": 32, "widths": [4, 8]}),
    ):
        model = fresh_model(outlier=True)
        report = quantize(model, method, config, calibration=calibration())
        with torch.no_grad():
            kl = measured_kl(reference, model(tiny_tokens).logits)
        points[method] = (report.bits_per_weight, kl)
    (b4, kl4), (b8, kl8), (bm, klm) = points["int4"], points["int8"], points["mixed"]
    assert b4 < bm < b8
    assert klm <= kl4 + (kl8 - kl4) * (bm - b4) / (b8 - b4)


def test_quality_budget_takes_the_fewest_bytes_that_fit() -> None:
    loose = quantize(
        fresh_model(outlier=True),
        "mixed",
        {"max_ppl_increase_pct": 50.0, "group_size": 32},
        calibration=calibration(),
    )
    tight = quantize(
        fresh_model(outlier=True),
        "mixed",
        {"max_ppl_increase_pct": 0.001, "group_size": 32},
        calibration=calibration(),
    )
    loose_plan = loose.extra["mixed"]["plan"]
    assert {bits for name, bits in loose_plan.items() if name != "lm_head"} == {4}
    assert tight.extra["mixed"]["estimated_ppl_increase_pct"] <= 0.001
    assert tight.bits_per_weight > loose.bits_per_weight


def test_the_reported_plan_passed_back_reproduces_it_without_calibration() -> None:
    first = quantize(
        fresh_model(outlier=True),
        "mixed",
        {"target_bits_per_weight": 6.0, "group_size": 32},
        calibration=calibration(),
    )
    again = quantize(
        fresh_model(outlier=True),
        "mixed",
        {
            "target_bits_per_weight": 6.0,
            "group_size": 32,
            "overrides": first.extra["mixed"]["overrides"],
        },
    )
    assert again.extra["mixed"]["plan"] == first.extra["mixed"]["plan"]
    assert again.bits_per_weight == first.bits_per_weight


@pytest.mark.parametrize(
    ("config", "param", "closest"),
    [
        ({"target_bits_per_weight": 3.0}, "target_bits_per_weight", "bits per weight"),
        ({"max_weight_bytes": 1000}, "max_weight_bytes", "bytes"),
        ({"max_ppl_increase_pct": 0.0, "widths": [4, 8]}, "max_ppl_increase_pct", "increase"),
    ],
)
def test_unreachable_budget_names_the_closest_plan(
    config: dict[str, object], param: str, closest: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(fresh_model(), "mixed", config, calibration=calibration())
    assert caught.value.param == param
    assert "closest plan" in caught.value.message and closest in caught.value.message


def test_a_budget_is_required() -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(fresh_model(), "mixed", {}, calibration=calibration())
    assert caught.value.param == "target_bits_per_weight"


def test_allocator_matches_brute_force_on_a_small_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    options = {}
    for i in range(6):
        loss4, loss8 = torch.rand(2, generator=gen).sort(descending=True).values.tolist()
        options[f"l{i}"] = [
            LayerOption(4, 100 + 10 * i, loss4),
            LayerOption(8, 200 + 20 * i, loss8 / 10),
            LayerOption(16, 400 + 40 * i, 0.0),
        ]
    allocator = Allocator(options, dict.fromkeys(options, 100))
    budget = 1900
    best = min(
        (
            (sum(o.loss for o in combo), combo)
            for combo in _combinations(list(options.values()))
            if sum(o.bytes for o in combo) <= budget
        ),
        key=lambda pair: pair[0],
    )
    plan = allocator.best_within(budget)
    assert plan.bytes <= budget
    assert plan.loss == pytest.approx(best[0])
    with pytest.raises(BudgetUnreachable):
        allocator.best_within(500)


def _combinations(layers: list[list[LayerOption]]) -> list[tuple[LayerOption, ...]]:
    combos: list[tuple[LayerOption, ...]] = [()]
    for opts in layers:
        combos = [(*c, o) for c in combos for o in opts]
    return combos


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("mixed", {"target_bits_per_weight": 6.0, "group_size": 32}),
        ("gptq", {"group_size": 32}),
        ("feedback", {"start": {"method": "int4", "config": {"group_size": 32}}, "rounds": 1}),
    ],
)
def test_artifact_round_trip_serves_the_same_logits(
    method: str, config: dict[str, object], tiny_tokens: torch.Tensor
) -> None:
    """What these methods build (int4, int8 and float layers side by side)
    survives quantized_state -> build_from_state unchanged."""
    model = fresh_model(outlier=True)
    quantize(model, method, config, calibration=calibration())
    tensors, plan = quantized_state(model)
    rebuilt = build_from_state(model.config, tensors, plan)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tiny_tokens).logits, model(tiny_tokens).logits)

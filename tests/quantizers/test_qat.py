"""Quantisation-aware training on a tiny random Llama: it lowers the quantised
model's divergence from float against its RTN start, serves on the same
kernels, round-trips through the artifact format, reports its steps and stops
when cancelled."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import LlamaForCausalLM

from quantizers.errors import ConfigError, QuantizationCancelled
from quantizers.methods.qat_data import generated_sequences
from quantizers.methods.qat_modules import FakeQuantLinear
from quantizers.methods.qat_train import TrainSettings, distillation_kl, lr_scheduler
from quantizers.registry import get_method, quantize
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.serialization import build_from_state, quantized_state

from .conftest import tiny_llama_config

# Short training on 8 sequences of 32 tokens: seconds on one core. Learning
# rates above the defaults (chosen for SmolLM2's hundreds of steps) so a dozen
# steps move a tiny model measurably.
SMALL = {
    "start": "rtn",
    "group_size": 32,
    "samples": 8,
    "seq_len": 32,
    "batch": 4,
    "block_steps": 12,
    "e2e_steps": 8,
    "lr": 5e-4,
    "scale_lr": 1e-3,
    "e2e_lr": 1e-3,
}
RTN = {**SMALL, "schedule": "block", "block_steps": 0}


def float_model() -> LlamaForCausalLM:
    """Wider weights than the default init, so int4 g32 hurts measurably."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()


def calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (1, 64), generator=gen) for _ in range(4)]


def kl_from(reference: LlamaForCausalLM, model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(distillation_kl(reference(ids).logits, model(ids).logits))


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_training_lowers_the_divergence_of_its_rtn_start_on_the_same_kernels(
    lr_schedule: str,
) -> None:
    reference = float_model()
    ids = torch.cat(calibration())
    rtn = copy.deepcopy(reference)
    quantize(rtn, "qat", RTN, calibration=calibration())
    trained = copy.deepcopy(reference)
    report = quantize(
        trained, "qat", {**SMALL, "lr_schedule": lr_schedule}, calibration=calibration()
    )

    assert kl_from(reference, trained, ids) < 0.8 * kl_from(reference, rtn, ids)
    assert isinstance(trained.model.layers[0].mlp.down_proj, Int4WeightOnlyLinear)
    assert (
        report.weight_bytes_after
        == quantize(copy.deepcopy(reference), "int4", {"group_size": 32}).weight_bytes_after
    )
    curves = report.extra["qat"]
    assert len(curves["block_losses"]) == 2 and len(curves["block_losses"][0]) == 12
    assert len(curves["e2e_losses"]) == 8
    assert curves["block_losses"][1][-1] < curves["block_losses"][1][0]


def test_cosine_schedule_decays_every_rate_from_its_own_to_zero_over_the_phase() -> None:
    settings = TrainSettings("both", 8, 0, 1e-3, 4e-3, 0.0, lr_schedule="cosine")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimiser = torch.optim.Adam(
        [{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 4e-3}]
    )
    scheduler = lr_scheduler(optimiser, 8, settings)
    rates = []
    for _ in range(8):
        rates.append([group["lr"] for group in optimiser.param_groups])
        optimiser.step()
        scheduler.step()
    assert rates[0] == pytest.approx([1e-3, 4e-3])
    assert rates[4] == pytest.approx([5e-4, 2e-3])
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in itertools.pairwise(rates))
    assert [group["lr"] for group in optimiser.param_groups] == pytest.approx([0, 0])


def test_no_training_reproduces_the_start_exactly() -> None:
    rtn = float_model()
    quantize(rtn, "int4", {"group_size": 32})
    qat = float_model()
    quantize(qat, "qat", RTN, calibration=calibration())
    ids = torch.cat(calibration())
    with torch.no_grad():
        torch.testing.assert_close(qat(ids).logits, rtn(ids).logits, rtol=0, atol=1e-2)


def test_the_fake_quantised_weight_is_what_the_kernel_serves() -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 48, bias=False)
    start = Int4WeightOnlyLinear.from_float(linear, 64)
    fake = FakeQuantLinear.from_runtime(start, linear.weight, "float")
    with torch.no_grad():
        fake.scale.mul_(1.1)
        fake.latent.add_(0.01)
    x = torch.randn(5, 96).to(torch.bfloat16)
    expected = x.float() @ fake.quantized_weight().detach().T
    torch.testing.assert_close(fake.to_runtime()(x).float(), expected, atol=2e-2, rtol=2e-2)


def test_artifact_round_trip_gives_identical_logits() -> None:
    model = float_model()
    quantize(model, "qat", SMALL, calibration=calibration())
    ids = torch.cat(calibration())
    with torch.no_grad():
        expected = model(ids).logits
    tensors, plan = quantized_state(model)
    rebuilt = build_from_state(model.config.to_dict(), tensors, plan)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, expected)


@pytest.mark.parametrize(
    "config",
    [
        {"bits": 8, "start": "rtn"},
        {"bits": 4, "start": "feedback", "group_size": 32},
        {"bits": 4, "start": "gptq", "group_size": 32},
        {
            "start": "mixed",
            "start_config": {"target_bits_per_weight": 6.0, "sensitivity_seq_len": 16},
        },
    ],
)
def test_int8_feedback_gptq_and_mixed_starts_train(config: dict) -> None:
    model = float_model()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (1, 64), generator=gen) for _ in range(8)]
    report = quantize(
        model, "qat", {**SMALL, **config, "block_steps": 2, "e2e_steps": 2}, calibration=batches
    )
    assert report.extra["qat"]["start"] == config["start"].replace("rtn", "int8")
    assert len(report.extra["qat"]["e2e_losses"]) == 2


def test_progress_reports_steps_loss_and_time_left_and_cancel_stops() -> None:
    details: list[dict] = []

    def progress(done: int, total: int, detail: dict | None = None) -> None:
        if detail is not None:
            details.append(detail)

    quantize(float_model(), "qat", SMALL, calibration=calibration(), progress=progress)
    assert [d["step"] for d in details] == list(range(1, 2 * 12 + 8 + 1))
    assert {d["phase"] for d in details} == {"block", "end_to_end"}
    assert all(d["steps"] == 32 and d["loss"] >= 0 and d["eta_s"] >= 0 for d in details)
    assert details[-1]["eta_s"] == 0

    steps: list[int] = []
    with pytest.raises(QuantizationCancelled):
        quantize(
            float_model(),
            "qat",
            SMALL,
            calibration=calibration(),
            progress=lambda done, total, detail=None: steps.append(done),
            should_cancel=lambda: len(steps) >= 3,
        )
    assert len(steps) == 3


def test_generated_data_is_deterministic_per_seed() -> None:
    model = float_model()
    first = generated_sequences(model, 3, 12, seed=7)
    assert first.shape == (3, 12)
    assert torch.equal(first, generated_sequences(model, 3, 12, seed=7))
    assert not torch.equal(first, generated_sequences(model, 3, 12, seed=8))


def test_generated_data_needs_no_calibration_text() -> None:
    report = quantize(
        float_model(), "qat", {**SMALL, "data": "generated", "block_steps": 2, "e2e_steps": 0}
    )
    assert report.extra["qat"]["sequences"] == [8, 32]


@pytest.mark.parametrize(
    ("config", "param"),
    [
        ({"bits": 3}, "bits"),
        ({"group_size": 100}, "group_size"),
        ({"start": "awq"}, "start"),
        ({"start": "mixed"}, "start_config"),
        ({"start_config": {"bogus": 1}}, "start_config"),
        ({"train": "everything"}, "train"),
        ({"schedule": "layerwise"}, "schedule"),
        ({"data": "wikitext"}, "data"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"block_steps": -1}, "block_steps"),
        ({"samples": 1.5}, "samples"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": True}, "seed"),
    ],
)
def test_bad_configs_name_the_field(config: dict, param: str) -> None:
    with pytest.raises(ConfigError) as caught:
        get_method("qat").make_config(config)
    assert caught.value.param == param


def test_calibration_data_without_calibration_text_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        quantize(float_model(), "qat", SMALL)
    assert caught.value.param == "data"

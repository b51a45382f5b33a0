"""Every method on every architecture: found layers, real quantised forwards, rebuilt artifacts.

Tiny random float32 models of eight families; each method's logits are
compared with the float model's, and the model rebuilt from its quantised
state (as an artifact load does) must compute exactly the same logits.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from quantizers import quantize
from quantizers.loading import LoadedModel, load_model
from quantizers.methods.smooth_groups import smoothing_plan
from quantizers.serialization import build_from_state, quantized_state
from tests.helpers.tiny_architectures import ARCHITECTURES, write_tiny_architecture

IDS = torch.tensor([list(range(30, 54))])
CALIBRATION = [
    torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)
]
# Relative error of the logits each method must stay under on these tiny models.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "int8": ({}, 0.05),
    "w8a8-dynamic": ({}, 0.06),
    "smoothquant": ({}, 0.08),
    "int4": ({"group_size": 32}, 0.5),
    "gptq": ({"group_size": 32}, 0.5),
    "bnb-int8": ({}, 0.06),
    "mixed": ({"target_bits_per_weight": 6.0}, 0.5),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(
        write_tiny_architecture(tmp_path_factory.mktemp(request.param), request.param)
    )


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_quantises_serves_and_rebuilds(loaded: LoadedModel, method: str) -> None:
    config, bound = METHODS[method]
    reference = _logits(loaded.model)
    model = copy.deepcopy(loaded.model)
    report = quantize(model, method, config, calibration=CALIBRATION)
    out = _logits(model)
    assert float((out - reference).norm() / reference.norm()) < bound
    linears = [n for n, m in loaded.model.named_modules() if type(m) is nn.Linear]
    blocks = [n for n in linears if "layers" in n or ".h." in n]
    assert set(blocks) <= set(report.layers), "every projection of every block is quantised"
    tensors, plan = quantized_state(model)
    rebuilt = build_from_state(model.config.to_dict(), tensors, plan)
    assert torch.equal(_logits(rebuilt), out)


def test_conv1d_projections_load_as_equal_linears(tmp_path: Path) -> None:
    directory = write_tiny_architecture(tmp_path / "gpt2", "gpt2")
    raw = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    converted = load_model(directory).model
    assert not any(type(m).__name__ == "Conv1D" for m in converted.modules())
    assert isinstance(converted.transformer.h[0].attn.c_attn, nn.Linear)
    torch.testing.assert_close(_logits(converted), _logits(raw), rtol=1e-5, atol=1e-5)


def test_smoothing_is_proven_or_reported(loaded: LoadedModel) -> None:
    """Every group found keeps the float model's output when smoothed; what is
    not smoothed has a reason."""
    model = copy.deepcopy(loaded.model)
    groups, refused = smoothing_plan(model)
    reference = _logits(model)
    for group in groups:
        factors = torch.rand(model.get_submodule(group.consumers[0]).in_features) + 0.5
        for tensor in group.producers:
            tensor.data.div_(factors.view(-1, *([1] * (tensor.dim() - 1))))
        for name in group.consumers:
            model.get_submodule(name).weight.data.mul_(factors)
    torch.testing.assert_close(_logits(model), reference, rtol=1e-3, atol=1e-3)
    consumers = {c for g in groups for c in g.consumers}
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert linears - {"lm_head", "embed_out"} <= consumers | set(refused)
    if loaded.model.config.model_type == "gemma3_text":
        # Gemma's norms scale by (1 + weight): folding into them would be wrong.
        assert "input_layernorm" in refused["model.layers.0.self_attn.q_proj"]
    if loaded.model.config.model_type in ("llama", "gpt2"):
        assert all(not n.endswith(("q_proj", "c_attn")) for n in refused)


def test_a_scaled_tied_embedding_shares_the_int8_head(tmp_path: Path) -> None:
    """Gemma multiplies embedding rows by sqrt(hidden): the int8 embedding that
    shares the head's codes carries the same multiplier."""
    loaded = load_model(write_tiny_architecture(tmp_path / "gemma", "gemma3_text"))
    reference = _logits(loaded.model)
    report = quantize(loaded.model, "int8")
    assert report.layers["lm_head"]["tied_embedding"] is True
    assert loaded.model.get_input_embeddings().multiplier == pytest.approx(64**0.5)
    out = _logits(loaded.model)
    assert float((out - reference).norm() / reference.norm()) < 0.05


@pytest.mark.parametrize("method", ["int8", "w8a8-dynamic"])
def test_every_linear_is_quantised_or_reported_in_float(loaded: LoadedModel, method: str) -> None:
    """int8 quantises the head (tied or not); w8a8 leaves it in float, and the
    report says so, naming the tie where there is one."""
    model = copy.deepcopy(loaded.model)
    report = quantize(model, method, METHODS[method][0])
    kept = report.extra["float_layers"]
    linears = {n for n, m in loaded.model.named_modules() if type(m) is nn.Linear}
    assert set(report.layers) | set(kept) == linears
    assert not set(report.layers) & set(kept)
    head = loaded.model.get_output_embeddings()
    head_name = next(n for n, m in loaded.model.named_modules() if m is head)
    tied = head.weight is loaded.model.get_input_embeddings().weight
    if method == "int8":
        assert head_name in report.layers
    else:
        assert ("tied to the input embedding" in kept[head_name]) == tied

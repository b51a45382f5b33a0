"""LoRA training on a frozen base, float and quantised: the loss falls, the base is
untouched, and the adapter it returns serves what it learnt (PEFT round trip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantizers import quantize
from quantizers.errors import ConfigError
from quantizers.lora import read_adapter, write_adapter
from quantizers.lora.train import LoraTrainConfig, TrainingCancelled, train_lora
from tests.engine.conftest import build_model

# A short repeating pattern: the random tiny model cannot predict it, an adapter can.
TOKENS = torch.tensor([5, 17, 42, 99, 3, 250, 77, 8] * 40)


@pytest.mark.parametrize("method", ["float", "int4"])
def test_training_lowers_the_loss_and_leaves_the_base_alone(tmp_path: Path, method: str) -> None:
    model = build_model()
    if method == "int4":
        quantize(model, "int4", {"group_size": 32})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    config = LoraTrainConfig(
        rank=4,
        alpha=8.0,
        steps=40,
        learning_rate=1e-2,
        seq_len=32,
        batch_size=2,
        target_modules=("q_proj", "v_proj", "down_proj"),
    )
    steps: list[int] = []
    result = train_lora(model, TOKENS, config, on_step=lambda step, loss: steps.append(step))
    assert steps == list(range(1, 41))
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    adapter = result.adapter
    assert len(adapter.modules) == 3 * 2 and adapter.rank == 4
    assert all(m.a.dtype == torch.float32 for m in adapter.modules.values())
    write_adapter(adapter, tmp_path / "trained")
    reloaded = read_adapter(tmp_path / "trained")
    for path, module in adapter.modules.items():
        assert torch.equal(reloaded.modules[path].b, module.b)
        assert reloaded.modules[path].scale == pytest.approx(module.scale)


def test_cancel_and_bad_configs() -> None:
    model = build_model()
    with pytest.raises(TrainingCancelled):
        train_lora(model, TOKENS, LoraTrainConfig(steps=5, seq_len=16), should_cancel=lambda: True)
    for bad, param in [
        ({"rank": 0}, "rank"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"target_modules": ()}, "target_modules"),
        ({"steps": 1.5}, "steps"),
    ]:
        with pytest.raises(ConfigError) as info:
            LoraTrainConfig(**bad)
        assert info.value.param == param
    with pytest.raises(ConfigError, match="no linear module"):
        train_lora(model, TOKENS, LoraTrainConfig(target_modules=("c_attn",), seq_len=16))
    with pytest.raises(ConfigError, match="fewer than"):
        train_lora(model, TOKENS[:10], LoraTrainConfig(seq_len=16))

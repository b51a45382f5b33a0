"""Registry, configs, overrides, skip list, progress, cancellation and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantizers import (
    ConfigError,
    LayerQuantizationError,
    QuantizationCancelled,
    get_method,
    list_methods,
    quantize,
)
from quantizers.loading import weight_bytes
from quantizers.methods.int4 import Int4Config
from quantizers.registry import MethodConfig, name_matches
from quantizers.runtime import Int4WeightOnlyLinear, Int8WeightOnlyLinear


def test_list_methods_includes_the_weight_only_methods() -> None:
    assert {"int8", "int4"} <= set(list_methods())


def test_unknown_method_names_the_method_field() -> None:
    with pytest.raises(ConfigError) as info:
        get_method("int3")
    assert info.value.param == "method" and "int8" in info.value.message


def test_config_round_trips_through_its_canonical_dict() -> None:
    config = Int4Config.from_dict({"group_size": 64, "overrides": {"*.mlp.*": {"group_size": 32}}})
    data = config.to_dict()
    assert data["group_size"] == 64 and data["skip"] == ["*embed_tokens*", "*norm*", "lm_head"]
    assert Int4Config.from_dict(data) == config
    assert Int4Config.from_dict(data).to_dict() == data


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"group_size": 48}, "group_size"),
        ({"group_size": True}, "group_size"),
        ({"bits": 4}, "bits"),
        ({"overrides": {"*.mlp.*": {"group_size": 100}}}, "group_size"),
        ({"overrides": {"*.mlp.*": {"alpha": 1}}}, "overrides.alpha"),
        ({"skip": "lm_head"}, "skip"),
        ({"overrides": {"re:([": {}}}, "overrides"),
    ],
)
def test_invalid_config_names_the_field(data: dict, param: str) -> None:
    with pytest.raises(ConfigError) as info:
        Int4Config.from_dict(data)
    assert info.value.param == param


def test_overrides_beat_the_skip_list_and_first_match_wins() -> None:
    config = Int4Config.from_dict(
        {
            "overrides": {
                "lm_head": {},
                "re:model\\.layers\\.0\\..*": None,
                "*.down_proj": {"group_size": 32},
                "*": {"skip": True},
            }
        }
    )
    assert config.for_layer("lm_head") is not None
    assert config.for_layer("model.layers.0.mlp.down_proj") is None
    assert config.for_layer("model.layers.1.mlp.down_proj").group_size == 32
    assert config.for_layer("model.layers.1.mlp.up_proj") is None


def test_default_skip_list() -> None:
    config = MethodConfig()
    assert config.for_layer("lm_head") is None
    assert config.for_layer("model.embed_tokens") is None
    assert config.for_layer("model.layers.3.self_attn.q_proj") is config
    assert name_matches("re:.*proj", "model.layers.0.mlp.up_proj")


def test_quantize_replaces_linears_and_reports(tiny_llama: nn.Module) -> None:
    before = weight_bytes(tiny_llama)
    calls: list[tuple[int, int]] = []
    report = quantize(
        tiny_llama,
        "int4",
        {"group_size": 64, "overrides": {"*.down_proj": {"group_size": 32}}},
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 14) for i in range(1, 15)]
    assert len(report.layers) == 14 and "lm_head" not in report.layers
    down = tiny_llama.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4WeightOnlyLinear) and down.group_size == 32
    assert report.layers["model.layers.0.mlp.down_proj"]["group_size"] == 32
    assert report.layers["model.layers.1.self_attn.q_proj"]["kind"] == "Int4WeightOnlyLinear"
    assert isinstance(tiny_llama.lm_head, nn.Linear)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    assert tiny_llama.model.embed_tokens.weight.dtype == torch.bfloat16
    assert report.weight_bytes_before == before
    assert report.weight_bytes_after == weight_bytes(tiny_llama) < before / 3
    # 4-bit codes on K padded 96 -> 128 for groups of 64, plus bf16 scales/offsets
    assert 5.3 < report.bits_per_weight < 6.0
    assert report.to_dict()["config"]["group_size"] == 64


def test_cancellation_stops_between_layers(tiny_llama: nn.Module) -> None:
    seen: list[int] = []
    with pytest.raises(QuantizationCancelled):
        quantize(
            tiny_llama,
            "int8",
            progress=lambda done, total: seen.append(done),
            should_cancel=lambda: len(seen) >= 3,
        )
    assert seen == [1, 2, 3]
    kinds = [type(m) for m in tiny_llama.modules()]
    assert kinds.count(Int8WeightOnlyLinear) == 3


def test_a_failing_layer_is_named(tiny_llama: nn.Module) -> None:
    # a weight whose shape cannot be grouped makes quantisation fail on that layer
    tiny_llama.model.layers[1].mlp.up_proj.weight = nn.Parameter(torch.randn(192))
    with pytest.raises(LayerQuantizationError) as info:
        quantize(tiny_llama, "int4", {"group_size": 32})
    assert info.value.layer == "model.layers.1.mlp.up_proj"
    assert "model.layers.1.mlp.up_proj" in str(info.value)


def test_pad_false_rejects_a_group_size_that_does_not_divide(tiny_llama: nn.Module) -> None:
    with pytest.raises(LayerQuantizationError) as info:
        quantize(tiny_llama, "int4", {"group_size": 64, "pad": False})
    assert info.value.param == "group_size" and "96" in info.value.message


def test_config_object_of_the_wrong_method_is_rejected(tiny_llama: nn.Module) -> None:
    with pytest.raises(ConfigError) as info:
        quantize(tiny_llama, "int8", Int4Config())
    assert info.value.param == "config"

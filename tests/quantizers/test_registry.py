"""Registry, configs, overrides, skip list, progress, cancellation and errors."""

from __future__ import annotations

import gc
import weakref

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
from quantizers.methods.int8 import Int8Config
from quantizers.registry import DEFAULT_SKIP, HEAD_INCLUDED_SKIP, MethodConfig, name_matches
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
    assert data["group_size"] == 64 and data["skip"] == ["*embed_tokens*", "*norm*"]
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


@pytest.mark.parametrize("config_cls", [Int8Config, Int4Config])
def test_int8_and_int4_quantise_lm_head_by_default(config_cls: type[MethodConfig]) -> None:
    config = config_cls()
    assert config.skip == HEAD_INCLUDED_SKIP
    assert config.for_layer("lm_head") is config
    assert config.for_layer("model.embed_tokens") is None
    assert config.for_layer("model.norm") is None
    assert config_cls(skip=DEFAULT_SKIP).for_layer("lm_head") is None


def test_quantize_replaces_linears_and_reports(tiny_llama: nn.Module) -> None:
    before = weight_bytes(tiny_llama)
    calls: list[tuple[int, int]] = []
    report = quantize(
        tiny_llama,
        "int4",
        {"group_size": 64, "overrides": {"*.down_proj": {"group_size": 32}}},
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 15) for i in range(1, 16)]
    assert len(report.layers) == 15 and report.layers["lm_head"]["tied_embedding"] is True
    down = tiny_llama.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4WeightOnlyLinear) and down.group_size == 32
    assert report.layers["model.layers.0.mlp.down_proj"]["group_size"] == 32
    assert report.layers["model.layers.1.self_attn.q_proj"]["kind"] == "Int4WeightOnlyLinear"
    assert isinstance(tiny_llama.lm_head, Int8WeightOnlyLinear)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    assert tiny_llama.model.norm.weight.dtype == torch.bfloat16
    assert report.weight_bytes_before == before
    assert report.weight_bytes_after == weight_bytes(tiny_llama) < before / 5
    # per block: K=96 layers in a group of 64 and a 32-wide partial group, no
    # padding stored: 4 bits + 2 x 32 bits of bf16 (scale, offset) per 96
    # weights = 4.67; down_proj g32 = 5.0; the int8 head 8 + 16 / 96 = 8.17
    weights = [(61440, 4 + 64 / 96)] * 2 + [(18432, 5.0)] * 2 + [(24576, 8 + 16 / 96)]
    expected = sum(n * bits for n, bits in weights) / sum(n for n, _ in weights)
    assert report.bits_per_weight == pytest.approx(expected)
    assert report.to_dict()["config"]["group_size"] == 64


def test_a_replaced_float_layer_is_freed_during_quantisation(tiny_llama: nn.Module) -> None:
    """Quantisation works layer by layer in place: once a layer's quantised
    form is installed nothing keeps its float weight, so memory beyond the
    float model stays about one layer plus the quantised result."""
    first = weakref.ref(tiny_llama.model.layers[0].self_attn.q_proj.weight)
    alive_after: list[bool] = []

    def progress(done: int, total: int) -> None:
        gc.collect()
        alive_after.append(first() is not None)

    quantize(tiny_llama, "int8", progress=progress)
    assert alive_after[0] is False and not any(alive_after)


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

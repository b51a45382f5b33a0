"""quantized_state -> build_from_state rebuilds an identical model without float weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from quantizers import quantize
from quantizers.artifacts import ArtifactStore, artifact_key
from quantizers.errors import QuantizationError
from quantizers.loading import weight_bytes
from quantizers.serialization import build_from_state, quantized_state


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("int8", {}),
        ("int4", {"group_size": 64}),
        ("int4", {"group_size": 32, "overrides": {"*.down_proj": {"group_size": 128}}}),
    ],
)
def test_round_trip_gives_identical_logits(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor, method: str, config: dict
) -> None:
    report = quantize(tiny_llama, method, config)
    expected = logits(tiny_llama, tiny_tokens)
    tensors, plan = quantized_state(tiny_llama)
    rebuilt = build_from_state(tiny_llama.config.to_dict(), tensors, plan)
    assert torch.equal(logits(rebuilt, tiny_tokens), expected)
    # the tied int8 head is no module of its own in the plan: the embedding
    # holds the shared codes and the head is rebuilt from them
    assert set(plan["modules"]) == set(report.layers) - {"lm_head"} | {"model.embed_tokens"}
    assert plan["tie_word_embeddings"] == "int8"


def test_artifact_store_round_trip_stores_the_shared_codes_once(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor, tmp_path: Path
) -> None:
    quantize(tiny_llama, "int4", {"group_size": 64})
    expected = logits(tiny_llama, tiny_tokens)
    tensors, plan = quantized_state(tiny_llama)
    assert not any(name.startswith("lm_head.") for name in tensors)
    assert tensors["model.embed_tokens.weight"].dtype == torch.int8
    store = ArtifactStore(tmp_path)
    key = artifact_key("c" * 64, "int4", {"group_size": 64}, None, 1)
    store.put(key, tensors, {"method": "int4", "plan": plan})
    artifact = ArtifactStore(tmp_path).get(key)
    assert artifact is not None
    # on disk: the in-memory bytes (tied codes counted once) plus a small
    # safetensors header; a second copy of the 256 x 96 codes would not fit
    assert artifact.bytes - weight_bytes(tiny_llama) < 256 * 96 // 2
    plan = artifact.manifest["plan"]
    rebuilt = build_from_state(tiny_llama.config, artifact.load_tensors(), plan)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    assert torch.equal(logits(rebuilt, tiny_tokens), expected)


def test_state_holds_tied_embeddings_once_and_keeps_rotary_in_float32(
    tiny_llama: nn.Module,
) -> None:
    quantize(tiny_llama, "int8", {"skip": ["*embed_tokens*", "*norm*", "lm_head"]})
    tensors, plan = quantized_state(tiny_llama)
    assert "lm_head.weight" not in tensors and plan["tie_word_embeddings"] is True
    assert tensors["model.rotary_emb.inv_freq"].dtype == torch.float32
    assert plan["dtype"] == "bfloat16"
    rebuilt = build_from_state(tiny_llama.config, tensors, plan)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight


def test_missing_tensors_are_an_error(tiny_llama: nn.Module) -> None:
    quantize(tiny_llama, "int8")
    tensors, plan = quantized_state(tiny_llama)
    del tensors["model.norm.weight"]
    with pytest.raises(QuantizationError, match=r"model\.norm\.weight"):
        build_from_state(tiny_llama.config, tensors, plan)


def test_unknown_kind_is_an_error(tiny_llama: nn.Module) -> None:
    quantize(tiny_llama, "int8")
    tensors, plan = quantized_state(tiny_llama)
    plan["modules"]["model.layers.0.mlp.up_proj"]["kind"] = "Int3Linear"
    with pytest.raises(QuantizationError, match="Int3Linear"):
        build_from_state(tiny_llama.config, tensors, plan)

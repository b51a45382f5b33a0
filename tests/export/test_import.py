"""Import: exports (ours, and llm-compressor's way of naming targets) load onto our
runtime modules from their codes and give the artifact's greedy output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantizers.export import export_artifact
from quantizers.export.importing import load_compressed_tensors, load_gguf_quantized
from quantizers.export.weights import ExportError, load_artifact_model
from quantizers.loading import load_model
from quantizers.runtime.embedding import Int8Embedding
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from quantizers.runtime.w8a8 import W8A8Linear
from tests.export.conftest import MakeArtifact

PROMPT = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119]])


def greedy(model: nn.Module) -> list[int]:
    with torch.inference_mode():
        out = model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=256)
    return out[0, PROMPT.shape[1]:].tolist()


def kinds(model: nn.Module) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()
            if name.endswith(("proj", "embed_tokens"))}


@pytest.mark.parametrize(("method", "config", "layer_kind"), [
    ("int4", {"group_size": 32}, Int4WeightOnlyLinear),
    ("int8", {}, Int8WeightOnlyLinear),
])
def test_gguf_import_keeps_the_codes_and_the_greedy_output(
    make_artifact: MakeArtifact, tmp_path: Path, method: str, config: dict, layer_kind: type
) -> None:
    artifact = make_artifact(method, config)
    export_artifact(artifact, "gguf", tmp_path / "model.gguf")
    ours, imported = load_artifact_model(artifact), load_gguf_quantized(tmp_path / "model.gguf")
    assert kinds(imported) == kinds(ours)
    assert isinstance(imported.model.layers[1].self_attn.k_proj, layer_kind)
    assert isinstance(imported.get_input_embeddings(), Int8Embedding)
    assert imported.get_output_embeddings().weight is imported.get_input_embeddings().weight
    assert greedy(imported) == greedy(ours)
    if method == "int8":  # Q8_0 holds int8 codes and bf16 scales exactly
        with torch.inference_mode():
            assert torch.equal(imported(PROMPT).logits, ours(PROMPT).logits)


@pytest.mark.parametrize(("method", "config", "calibrate", "layer_kind"), [
    ("gptq", {"group_size": 32}, True, Int4WeightOnlyLinear),
    ("int8", {}, False, Int8WeightOnlyLinear),
    ("w8a8-dynamic", {}, False, W8A8Linear),
    ("w8a8-static", {}, True, W8A8Linear),
])
def test_compressed_tensors_import_serves_on_our_kernels(
    make_artifact: MakeArtifact, tmp_path: Path, method: str, config: dict, calibrate: bool,
    layer_kind: type,
) -> None:
    artifact = make_artifact(method, config, calibrate)
    export_artifact(artifact, "compressed-tensors", tmp_path / "ct", float_type="f32")
    ours, imported = load_artifact_model(artifact), load_compressed_tensors(tmp_path / "ct")
    assert isinstance(imported.model.layers[0].mlp.down_proj, layer_kind)
    assert greedy(imported) == greedy(ours)


def test_llm_compressor_style_targets_and_symmetric_int4(
    make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    """llm-compressor names targets by class ("Linear") with an ignore list, and
    its W4A16 preset is symmetric (no zero points): both load onto int4 modules."""
    artifact = make_artifact("gptq", {"group_size": 32}, True)
    directory = tmp_path / "ct"
    export_artifact(artifact, "compressed-tensors", directory, float_type="f32")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    group["targets"] = ["Linear"]
    group["weights"]["symmetric"] = True
    config["quantization_config"]["ignore"] = ["lm_head"]
    config_path.write_text(json.dumps(config))
    imported = load_compressed_tensors(directory)
    down = imported.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4WeightOnlyLinear)
    _, _, zero = down.unpacked()
    assert torch.allclose(zero, torch.full_like(zero, 8.0), atol=1e-2)


def test_load_model_imports_and_labels_the_variant(
    make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    artifact = make_artifact("int8")
    export_artifact(artifact, "compressed-tensors", tmp_path / "ct")
    export_artifact(artifact, "gguf", tmp_path / "model.gguf")
    loaded = load_model(tmp_path / "ct")
    assert loaded.quantization == {"method": "imported", "format": "compressed-tensors"}
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, Int8WeightOnlyLinear)
    as_float = load_model(tmp_path / "model.gguf")
    assert as_float.quantization is None
    assert type(as_float.model.model.layers[0].mlp.up_proj) is nn.Linear
    native = load_model(tmp_path / "model.gguf", quantized_gguf=True)
    assert native.quantization == {"method": "imported", "format": "gguf"}
    assert native.tokenizer("Hi").input_ids == loaded.tokenizer("Hi").input_ids


def test_unsupported_scheme_is_a_clear_error(make_artifact: MakeArtifact, tmp_path: Path) -> None:
    artifact = make_artifact("int8")
    export_artifact(artifact, "compressed-tensors", tmp_path / "ct")
    config_path = tmp_path / "ct" / "config.json"
    config = json.loads(config_path.read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["type"] = "float"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="float weights"):
        load_compressed_tensors(tmp_path / "ct")

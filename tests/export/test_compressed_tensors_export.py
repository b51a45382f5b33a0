"""compressed-tensors export decompressed by the `compressed-tensors` library through
transformers (CPU): the same weights as our artifact and the same greedy output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantizers.export import export_artifact
from quantizers.export.compressed_tensors_dir import pack_int32
from quantizers.export.weights import (
    Int4Weight,
    Int8Weight,
    dequantize,
    load_artifact_model,
    model_weights,
)
from tests.export.conftest import MakeArtifact

pytest.importorskip("compressed_tensors")

CASES = {
    "int8": ("int8", {}, False),
    "w8a8-dynamic": ("w8a8-dynamic", {}, False),
    "w8a8-static": ("w8a8-static", {}, True),
    "gptq-mixed": ("gptq", {"group_size": 32, "overrides": {"*mlp*": {"bits": 8}}}, True),
    "int4-rtn": ("int4", {"group_size": 32}, False),
}


def decompressed(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.float32,
    ).eval()


def library_decompressed(directory: Path) -> dict[str, torch.Tensor]:
    """Every quantised layer's weight decompressed by the compressed-tensors library
    with the scheme of its own config group. (transformers 5's loader applies one
    scheme to every dense layer, so it cannot read mixed plans.)"""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    quant = json.loads((directory / "config.json").read_text())["quantization_config"]
    weights = {}
    for group in quant["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        compressor = BaseCompressor.get_value_from_registry(group["format"])
        for layer in group["targets"]:
            state = {k.removeprefix(f"{layer}."): v for k, v in tensors.items()
                     if k.startswith(f"{layer}.")}
            weights[f"{layer}.weight"] = compressor.decompress(state, scheme)["weight"].float()
    return weights


def float_twin(artifact: object) -> tuple[nn.Module, dict[str, object]]:
    """The float32 architecture holding our artifact's dequantised weights, and those weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ours = dict(model_weights(load_artifact_model(artifact)))  # type: ignore[arg-type]
    config = dict(artifact.manifest["hf_config"])  # type: ignore[attr-defined]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"),
                                                                  **config),
                                             dtype=torch.float32)
    state = {name: dequantize(weight) for name, weight in ours.items()}  # type: ignore[arg-type]
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval(), ours


def greedy(model: nn.Module) -> list[int]:
    prompt = torch.tensor([[72, 101, 108, 108, 111, 32, 119]])
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=256)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_decompressed_weights_match_the_artifact(
    case: str, make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    method, config, calibrate = CASES[case]
    artifact = make_artifact(method, config, calibrate)
    report = export_artifact(artifact, "compressed-tensors", tmp_path / "ct", float_type="f32")
    mixed = method == "gptq"
    hf = None if mixed else decompressed(tmp_path / "ct")
    layers = library_decompressed(tmp_path / "ct")
    twin, ours = float_twin(artifact)
    for name, weight in ours.items():
        if hf is not None:
            theirs = hf.get_parameter(name).detach()
            if name in layers:
                assert torch.equal(theirs, layers[name]), name
        else:
            theirs = layers.get(name, twin.get_parameter(name).detach())
        error = (theirs - dequantize(weight)).abs().max().item()  # type: ignore[arg-type]
        if isinstance(weight, Int4Weight):
            layer = report["layers"][name.removesuffix(".weight")]
            assert error == pytest.approx(layer["max_abs_error"], abs=1e-7), name
            # Only the zero point moves to an integer: at most half a step per group.
            assert error <= 0.5 * weight.scale.max().item() + 1e-6, name
            if method == "gptq":  # integer zero points: only the kernel's bf16 offset rounds
                assert error <= 2**-8 * weight.offset.abs().max().item(), name
        else:
            assert error == 0.0, name  # int8 codes and float32 scales are carried exactly
    if hf is not None and method != "int4":
        assert greedy(hf) == greedy(twin)


def test_config_names_each_scheme_and_its_layers(
    make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    artifact = make_artifact(*CASES["gptq-mixed"])
    export_artifact(artifact, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == "pack-quantized"
    assert config["tie_word_embeddings"] is True
    by_bits = {g["weights"]["num_bits"]: g for g in quant["config_groups"].values()}
    assert sorted(by_bits) == [4, 8]
    assert by_bits[4]["weights"] | {"observer": None} == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32,
        "dynamic": False, "observer": None}
    assert all("mlp" in t for t in by_bits[8]["targets"])
    assert all("self_attn" in t for t in by_bits[4]["targets"])
    assert len(by_bits[4]["targets"]) + len(by_bits[8]["targets"]) == 14
    files = {p.name for p in (tmp_path / "ct").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files


def test_packing_matches_the_library() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 16, (6, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_int32(codes, 4), pack_to_int32((codes - 8).to(torch.int8), 4))
    bytes_ = torch.randint(0, 256, (3, 36), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_int32(bytes_, 8), pack_to_int32((bytes_ - 128).to(torch.int8), 8))
    assert isinstance(Int8Weight, type)

"""GGUF export read back with the `gguf` package: every tensor against our artifact."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from quantizers.export import ExportError, export_artifact
from quantizers.export.gguf_file import qk_row_order
from quantizers.export.weights import Int4Weight, dequantize, load_artifact_model, model_weights
from tests.export.conftest import MakeArtifact

CASES = {
    "int4-g32": ("int4", {"group_size": 32}, False),
    "int4-g64-float-head": ("int4", {"group_size": 64, "skip": ["*embed_tokens*", "*norm*",
                                                                "lm_head"]}, False),
    "int8": ("int8", {}, False),
    "w8a8-dynamic": ("w8a8-dynamic", {}, False),
    "gptq-mixed": ("gptq", {"group_size": 32, "overrides": {"*mlp*": {"bits": 8}}}, True),
}


def _expected(artifact: object) -> dict[str, tuple[torch.Tensor, str]]:
    """GGUF name -> (our float32 weight, in llama.cpp's row order; our kind)."""
    model = load_artifact_model(artifact)  # type: ignore[arg-type]
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    expected = {}
    for name, weight in model_weights(model):
        values = dequantize(weight)
        for suffix, heads in (("q_proj.weight", config.num_attention_heads),
                              ("k_proj.weight", config.num_key_value_heads)):
            if name.endswith(suffix):
                values = values[qk_row_order(values.shape[0], heads)]
        kind = "float" if isinstance(weight, torch.Tensor) else (
            "int4" if isinstance(weight, Int4Weight) else "int8")
        expected[names.get_name(name, try_suffixes=(".weight", ".bias"))] = (values, kind)
    return expected


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_reads_back_as_our_weights(
    case: str, make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    method, config, calibrate = CASES[case]
    artifact = make_artifact(method, config, calibrate)
    report = export_artifact(artifact, "gguf", tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    expected = _expected(artifact)
    assert {t.name for t in reader.tensors} == set(expected)
    type_of = {"int4": "Q4_1", "int8": "Q8_0"}
    for tensor in reader.tensors:
        ours, kind = expected[tensor.name]
        theirs = torch.from_numpy(
            np.array(gguf_dequantize(tensor.data, tensor.tensor_type))
        ).float().reshape(ours.shape)
        got = tensor.tensor_type.name
        if kind == "float":
            assert got == ("F32" if ours.ndim == 1 else "BF16")
            assert torch.equal(theirs, ours.to(torch.bfloat16).float() if ours.ndim > 1
                               else ours)
            continue
        assert got == type_of[kind], tensor.name
        error = (theirs - ours).abs().max().item()
        if kind == "int8" and method != "w8a8-dynamic":
            assert error == 0.0, tensor.name  # bfloat16 scales fit float16 exactly
        else:
            # W8A8's float32 scales and Q4_1's minimum are rounded to float16.
            assert error <= 1e-3 * ours.abs().max().item(), tensor.name
        assert error == pytest.approx(report["tensors"][tensor.name]["max_abs_error"])


def test_metadata_and_tokenizer_are_carried_over(
    make_artifact: MakeArtifact, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    artifact = make_artifact("int4", {"group_size": 32})
    export_artifact(artifact, "gguf", tmp_path / "model.gguf")
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def value(name: str) -> object:
        return fields[name].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.attention.head_count") == 4
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.block_count") == 2
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    assert value("quantserve.artifact_key") == artifact.key
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 300
    assert tokens[256] == "<|endoftext|>"
    assert tokens[: len(tokenizer) - 1] == tokenizer.convert_ids_to_tokens(
        list(range(len(tokenizer) - 1)))
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.chat_template") == tokenizer.chat_template


def test_transformers_reads_the_export_back_in_its_own_row_order(
    make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    """transformers' GGUF loader undoes llama.cpp's query/key permutation itself, so
    its q_proj must equal ours: proof that the rows were permuted the right way."""
    from transformers import AutoModelForCausalLM

    artifact = make_artifact("int8")
    export_artifact(artifact, "gguf", tmp_path / "model.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                  dtype=torch.float32)
    ours = dict(model_weights(load_artifact_model(artifact)))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(loaded.get_parameter(name).detach(), dequantize(ours[name])), name


def test_existing_output_and_unknown_format_are_refused(
    make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    artifact = make_artifact("int8")
    (tmp_path / "taken.gguf").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        export_artifact(artifact, "gguf", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep me"
    with pytest.raises(ExportError, match="unknown export format"):
        export_artifact(artifact, "onnx", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


def test_bitsandbytes_layers_are_refused_with_a_clear_error(
    make_artifact: MakeArtifact, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    artifact = make_artifact("bnb-nf4")
    with pytest.raises(ExportError, match="no equivalent"):
        export_artifact(artifact, "gguf", tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []

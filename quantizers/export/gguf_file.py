"""Write a quantised model as a GGUF file that llama.cpp and Ollama load unchanged.

Mapping (per tensor, so mixed plans keep each layer's own format):
  int4 groups of g (a multiple of 32)  -> Q4_1: w = q * d + m per 32 weights,
      d = our scale, m = our offset - 8 * scale; a group of 64 or 128 repeats
      its (d, m) over its 32-blocks, so the codes are carried over unchanged.
  int8 per channel (weight-only, W8A8, the int8 embedding)  -> Q8_0: w = q * d
      per 32 weights, d = the row's scale on every block. W8A8's activation
      quantisation has no GGUF equivalent: llama.cpp quantises activations itself.
  float -> the chosen float type (norms always F32, as llama.cpp expects).
GGUF stores d and m as float16. Our scales are bfloat16 and fit float16 exactly
when within its normal range; m is a difference of two bfloat16 numbers and
may need more mantissa bits than float16 has: `GGUFReport` measures that
rounding per tensor. llama.cpp's llama architecture rotates query/key pairs
interleaved where transformers rotates halves, so their rows are permuted as
llama.cpp's own converter does (whole rows move, so codes and scales move with them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from quantizers.export.weights import (
    ExportError,
    ExportTensor,
    Int4Weight,
    Int8Weight,
    dequantize,
    model_weights,
)
from quantizers.packing import INT4_MID

FloatType = Literal["f32", "f16", "bf16"]
BLOCK = 32
_FLOAT_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
}
_TORCH_FLOAT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Token types of llama.cpp's vocabulary (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass
class TensorReport:
    """One written tensor: its GGUF type and, for quantised ones, how far the
    GGUF numbers are from ours (0.0 where the format holds them exactly)."""

    type: str
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    note: str | None = None


@dataclass
class GGUFReport:
    path: Path
    bytes: int
    tensors: dict[str, TensorReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "max_abs_error": max((t.max_abs_error for t in self.tensors.values()), default=0.0),
            "tensors": {name: vars(t) for name, t in self.tensors.items()},
        }


def q4_1_blocks(weight: Int4Weight) -> tuple[np.ndarray, Tensor]:
    """[N, K / 32 * 20] bytes of Q4_1 blocks, and the float32 weight they decode to."""
    n, k = weight.q.shape
    per_group = weight.group_size // BLOCK
    blocks = k // BLOCK
    scale = weight.scale.repeat_interleave(per_group, dim=1)[:, :blocks]
    offset = weight.offset.repeat_interleave(per_group, dim=1)[:, :blocks]
    d = scale.to(torch.float16)
    m = (offset - INT4_MID * scale).to(torch.float16)
    _check_finite(d, m)
    q = weight.q.reshape(n, blocks, BLOCK).to(torch.uint8)
    qs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    raw = torch.cat([d.view(torch.uint8).reshape(n, blocks, 2),
                     m.view(torch.uint8).reshape(n, blocks, 2), qs], dim=-1)
    decoded = q.float() * d.float()[..., None] + m.float()[..., None]
    return raw.reshape(n, -1).numpy(), decoded.reshape(n, k)


def q8_0_blocks(weight: Int8Weight) -> tuple[np.ndarray, Tensor]:
    """[N, K / 32 * 34] bytes of Q8_0 blocks, and the float32 weight they decode to."""
    n, k = weight.q.shape
    blocks = k // BLOCK
    d = weight.scale.to(torch.float16)[:, None].expand(n, blocks)
    _check_finite(d)
    q = weight.q.reshape(n, blocks, BLOCK)
    raw = torch.cat([d.contiguous().view(torch.uint8).reshape(n, blocks, 2),
                     q.view(torch.uint8)], dim=-1)
    decoded = q.float() * d.float()[..., None]
    return raw.reshape(n, -1).numpy(), decoded.reshape(n, k)


def _check_finite(*tensors: Tensor) -> None:
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise ExportError("a scale is outside float16's range; GGUF cannot hold it")


def _float_bytes(tensor: Tensor, kind: FloatType) -> np.ndarray:
    data = tensor.detach().to(_TORCH_FLOAT[kind]).contiguous()
    return data.view(torch.uint8).reshape(*data.shape[:-1], -1).numpy()


def qk_row_order(rows: int, heads: int) -> Tensor:
    """Row order turning transformers' half-split rotary layout into llama.cpp's
    interleaved one, for a projection of `heads` heads."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


def _reorder(weight: ExportTensor, order: Tensor) -> ExportTensor:
    return weight[order] if isinstance(weight, Tensor) else weight.rows(order)


def _encode(
    weight: ExportTensor, float_type: FloatType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType, TensorReport]:
    if isinstance(weight, Tensor):
        if weight.ndim == 1:
            return weight.float().numpy(), gguf.GGMLQuantizationType.F32, TensorReport("F32")
        kind = _FLOAT_TYPES[float_type]
        return _float_bytes(weight, float_type), kind, TensorReport(kind.name)
    k = weight.q.shape[1]
    if k % BLOCK:
        fallback = _FLOAT_TYPES[float_type]
        return (_float_bytes(dequantize(weight), float_type), fallback,
                TensorReport(fallback.name, note=f"{k} inputs: not a multiple of {BLOCK}"))
    if isinstance(weight, Int4Weight):
        raw, decoded = q4_1_blocks(weight)
        kind = gguf.GGMLQuantizationType.Q4_1
    else:
        raw, decoded = q8_0_blocks(weight)
        kind = gguf.GGMLQuantizationType.Q8_0
    ours = dequantize(weight)
    error = (decoded - ours).abs()
    report = TensorReport(
        kind.name, float(error.max()),
        float((error / ours.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).max()),
        note="activation quantisation dropped" if getattr(weight, "activations", None) else None,
    )
    return raw, kind, report


def _architecture(writer: gguf.GGUFWriter, config: dict[str, Any]) -> tuple[int, int]:
    """Llama hyperparameters; returns (query heads, key/value heads)."""
    if config.get("model_type") != "llama":
        raise ExportError(f"GGUF export supports llama-architecture models, not "
                          f"{config.get('model_type')!r}")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ExportError("GGUF export supports plain rotary embeddings (no rope scaling)")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // heads))
    writer.add_vocab_size(int(config["vocab_size"]))
    return heads, kv_heads


def copy_gguf_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every tokenizer.* field of a GGUF file, as it is (vocabulary, merges,
    pre-tokenizer, special ids, chat template), so llama.cpp tokenises the
    export exactly like the file the model came from."""
    reader = gguf.GGUFReader(source)
    for name, entry in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = entry.types[0]
        sub = entry.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, entry.contents(), kind, sub_type=sub)


def hf_tokenizer(writer: gguf.GGUFWriter, directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's `gpt2` vocabulary; special
    token ids and the chat template come via gguf's SpecialVocab."""
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise ExportError("GGUF export carries byte-level BPE tokenizers only")
    tokens: dict[int, tuple[str, int]] = {
        index: (text, _NORMAL) for text, index in data["model"]["vocab"].items()
    }
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = (added["content"],
                               _CONTROL if added.get("special") else _USER_DEFINED)
    size = max(vocab_size, max(tokens) + 1)
    entries = [tokens.get(i, (f"[PAD{i}]", _UNUSED)) for i in range(size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([text for text, _ in entries])
    writer.add_token_types([kind for _, kind in entries])
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    else:
        # GGUF cannot store an empty array, and readers (transformers) rebuild a
        # missing merge list from token scores: equal scores rebuild none.
        writer.add_token_scores([0.0] * size)
    gguf.SpecialVocab(directory, n_vocab=size).add_to_gguf(writer)


def write_gguf(
    model: nn.Module,
    hf_config: dict[str, Any],
    output: Path,
    tokenizer: Callable[[gguf.GGUFWriter], None],
    *,
    name: str,
    float_type: FloatType = "bf16",
    extra: dict[str, str] | None = None,
) -> GGUFReport:
    """Write `model` (a quantised llama) to `output`; `tokenizer` adds the vocabulary."""
    writer = gguf.GGUFWriter(output, "llama")
    heads, kv_heads = _architecture(writer, hf_config)
    writer.add_name(name)
    writer.add_quantized_by("quantserve")
    for key, value in (extra or {}).items():
        writer.add_string(f"quantserve.{key}", value)
    tokenizer(writer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(hf_config["num_hidden_layers"]))
    report = GGUFReport(output, 0)
    kinds: set[gguf.GGMLQuantizationType] = set()
    for hf_name, weight in model_weights(model):
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF name in the llama architecture")
        for suffix, heads_of in (("q_proj.weight", heads), ("k_proj.weight", kv_heads)):
            if hf_name.endswith(suffix):
                rows = weight.shape[0] if isinstance(weight, Tensor) else weight.q.shape[0]
                weight = _reorder(weight, qk_row_order(rows, heads_of))
        data, kind, tensor_report = _encode(weight, float_type)
        kinds.add(kind)
        writer.add_tensor(target, data, raw_dtype=kind)
        report.tensors[target] = tensor_report
    writer.add_file_type(_file_type(kinds, float_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report.bytes = output.stat().st_size
    return report


def _file_type(kinds: set[gguf.GGMLQuantizationType], float_type: FloatType) -> int:
    """The file type llama.cpp reports: the dominant quantisation."""
    if gguf.GGMLQuantizationType.Q4_1 in kinds:
        return gguf.LlamaFileType.MOSTLY_Q4_1
    if gguf.GGMLQuantizationType.Q8_0 in kinds:
        return gguf.LlamaFileType.MOSTLY_Q8_0
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16}[float_type]

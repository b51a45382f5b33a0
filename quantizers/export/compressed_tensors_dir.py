"""Write a quantised model as a compressed-tensors checkpoint (what llm-compressor
writes and vLLM loads with no flags): config.json with a `quantization_config`,
one safetensors file, the tokenizer files.

Mapping per linear layer, one config group per distinct scheme:
  int4 groups of g  -> `pack-quantized`, int4 group strategy, asymmetric: codes
      packed eight to an int32 along the input, zero points packed along the
      output. The format's zero point is an integer; ours (float for RTN int4,
      integer for GPTQ) is rounded, which moves each weight of a group by the
      same amount: `CTReport` measures it per layer.
  int8 weight-only  -> `pack-quantized`, int8 channel strategy, symmetric.
  W8A8              -> `int-quantized`: int8 weights, int8 activations, dynamic
      per token or static per tensor with our zero point.
The int8 embedding shared with lm_head has no compressed-tensors form (vLLM
quantises linear layers only): it is written dequantised, in `float_dtype`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from quantizers.export.weights import (
    Int4Weight,
    Int8Weight,
    dequantize,
    model_weights,
)
from quantizers.packing import INT4_MID

QUANT_METHOD = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class CTReport:
    path: Path
    bytes: int = 0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "max_abs_error": max((v["max_abs_error"] for v in self.layers.values()),
                                 default=0.0),
            "layers": self.layers,
        }


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """[R, C] unsigned codes (< 2**bits, bits 4 or 8) -> [R, ceil(C * bits / 32)]
    int32, element i at bit (i * bits) % 32 of word i * bits // 32."""
    per_word = 32 // bits
    rows, cols = codes.shape
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, (-cols) % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (codes.reshape(rows, -1, per_word) << shifts).sum(dim=-1)
    # Keep the low 32 bits as a signed int32 (the top code sets the sign bit).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _int4_tensors(w: Int4Weight, dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor]:
    """The tensors of one pack-quantized int4 layer and the weight they decode to."""
    n, k = w.q.shape
    zero = (INT4_MID - w.offset / w.scale).round().clamp(0, 2 * INT4_MID - 1)
    scale = w.scale.to(dtype)
    tensors = {
        "weight_packed": pack_int32(w.q, 4),
        "weight_scale": scale,
        "weight_zero_point": pack_int32(zero.t().contiguous(), 4).t().contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    decoded = (w.q.float() - zero.repeat_interleave(w.group_size, 1)[:, :k]) * (
        scale.float().repeat_interleave(w.group_size, 1)[:, :k])
    return tensors, decoded


def _int8_tensors(w: Int8Weight, dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor]:
    n, k = w.q.shape
    scale = w.scale.to(dtype)[:, None]
    decoded = w.q.float() * scale.float()
    if w.activations is None:
        packed = pack_int32((w.q.to(torch.int16) + 128).to(torch.uint8), 8)
        return {"weight_packed": packed, "weight_scale": scale,
                "weight_shape": torch.tensor([n, k], dtype=torch.int64)}, decoded
    tensors = {"weight": w.q.contiguous(), "weight_scale": scale}
    if w.activations == "static":
        tensors["input_scale"] = w.input_scale.reshape(1).to(dtype)
        tensors["input_zero_point"] = w.input_zero.reshape(1).to(torch.int8)
    return tensors, decoded


def scheme(weight: Int4Weight | Int8Weight) -> dict[str, Any]:
    """The config group (minus targets) that describes `weight`."""
    if isinstance(weight, Int4Weight):
        return {
            "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                        "group_size": weight.group_size, "dynamic": False},
            "input_activations": None,
        }
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
               "group_size": None, "dynamic": False}
    if weight.activations is None:
        return {"format": "pack-quantized", "weights": weights, "input_activations": None}
    if weight.activations == "dynamic":
        inputs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                  "dynamic": True}
    else:
        inputs = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor",
                  "dynamic": False}
    return {"format": "int-quantized", "weights": weights, "input_activations": inputs}


def _embedding_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules()
            if module is model.get_input_embeddings()}


def write_compressed_tensors(
    model: nn.Module,
    hf_config: dict[str, Any],
    output: Path,
    tokenizer_files: dict[str, Path],
    *,
    float_dtype: torch.dtype = torch.bfloat16,
) -> CTReport:
    """Write the checkpoint directory `output` (created; must not exist yet)."""
    output.mkdir(parents=True)
    tensors: dict[str, Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    report = CTReport(output)
    embeddings = _embedding_names(model)
    for name, weight in model_weights(model):
        module = name.removesuffix(".weight")
        quantised = isinstance(weight, Int4Weight | Int8Weight)
        if not quantised or name in embeddings:
            tensors[name] = dequantize(weight).to(float_dtype).contiguous() if quantised \
                else _float(weight, float_dtype)
            continue
        encode = _int4_tensors if isinstance(weight, Int4Weight) else _int8_tensors
        parts, decoded = encode(weight, float_dtype)
        for key, tensor in parts.items():
            tensors[f"{module}.{key}"] = tensor.contiguous()
        ours = dequantize(weight)
        report.layers[module] = {
            "format": scheme(weight)["format"],
            "max_abs_error": float((decoded - ours).abs().max()),
        }
        group = json.dumps(scheme(weight), sort_keys=True)
        groups.setdefault(group, {**scheme(weight), "targets": []})["targets"].append(module)
    config_groups = {f"group_{i}": group for i, group in enumerate(groups.values())}
    formats = {group["format"] for group in groups.values()}
    config = {
        **hf_config,
        "dtype": str(float_dtype).removeprefix("torch."),
        "quantization_config": {
            "quant_method": QUANT_METHOD,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": sorted(_float_linears(model, report.layers)),
            "kv_cache_scheme": None,
        },
    }
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, output / WEIGHTS_FILE, metadata={"format": "pt"})
    for file_name, source in tokenizer_files.items():
        shutil.copyfile(source, output / file_name)
    report.bytes = sum(p.stat().st_size for p in output.iterdir())
    return report


def _float(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()


def _float_linears(model: nn.Module, quantised: dict[str, Any]) -> list[str]:
    """Linear layers left in float (lm_head when untied), which vLLM must not quantise."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in quantised]

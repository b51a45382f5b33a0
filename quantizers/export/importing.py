"""Serve exported checkpoints on our kernels: compressed-tensors directories (ours or
llm-compressor's) and GGUF files with Q8_0 / Q4_0 / Q4_1 tensors.

Where a stored layout matches a runtime module its integer codes are used as
they are, with no float round trip:
  pack-quantized int4, groups of 32/64/128 (asymmetric or symmetric) -> Int4WeightOnlyLinear
  pack-quantized int8 per channel, symmetric                       -> Int8WeightOnlyLinear
  int-quantized int8 weights + int8 activations (token / tensor)    -> W8A8Linear
  GGUF Q4_1 / Q4_0 (w = q*d + m, m = -8d for Q4_0) -> Int4WeightOnlyLinear, groups of 32
  GGUF Q8_0 whose blocks share their row's d         -> Int8WeightOnlyLinear / Int8Embedding
Anything else (another scheme, Q8_0 with a scale per block, float types) is
dequantised into a float layer. Our int4 kernels hold (scale, offset) in
bfloat16, so GGUF's float16 d and m are rounded once more on the way in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from quantizers.export.gguf_file import BLOCK, qk_row_order
from quantizers.export.weights import ExportError
from quantizers.packing import INT4_MID
from quantizers.runtime.base import COMPUTE_DTYPE
from quantizers.runtime.embedding import Int8Embedding
from quantizers.runtime.int4 import GROUP_SIZES, Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from quantizers.runtime.w8a8 import W8A8Linear

CT_METHOD = "compressed-tensors"


def is_compressed_tensors_dir(path: Path) -> bool:
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return False
    quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    return quant.get("quant_method") == CT_METHOD


def _skeleton(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=COMPUTE_DTYPE)


def _install(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _set_float(model: nn.Module, name: str, tensor: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    value = tensor.to(COMPUTE_DTYPE) if tensor.is_floating_point() else tensor
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _finish(model: nn.Module) -> nn.Module:
    """Tie lm_head as the config says, recompute rotary buffers, check completeness."""
    if getattr(model.config, "tie_word_embeddings", False):
        embedding = model.get_input_embeddings()
        if isinstance(embedding, Int8Embedding):
            model.set_output_embeddings(Int8WeightOnlyLinear.tied_to(embedding))
        else:
            model.get_output_embeddings().weight = embedding.weight
    # Rotary frequencies are derived buffers, left on meta by the skeleton.
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            with torch.device("cpu"):
                fresh = type(module)(config=model.config)
            for key, buffer in fresh.named_buffers(recurse=False):
                module._buffers[key] = buffer
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ExportError(f"checkpoint is missing tensors: {', '.join(missing[:5])}")
    return model.eval()


# --- compressed-tensors -----------------------------------------------------------------


def unpack_int32(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of pack_int32 along the last dim: [R, W] int32 -> [R, count] unsigned codes."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :count]


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or type(module).__name__ == target


def _ct_module(scheme: dict[str, Any], fmt: str, parts: dict[str, Tensor]) -> nn.Module:
    weights, inputs = scheme["weights"], scheme.get("input_activations")
    bits, strategy = weights["num_bits"], weights["strategy"]
    bias = parts.get("bias")
    if weights.get("type", "int") != "int":
        raise ExportError(f"{weights.get('type')} weights are not supported")
    if fmt == "pack-quantized" and inputs is None:
        n, k = (int(v) for v in parts["weight_shape"])
        q = unpack_int32(parts["weight_packed"], bits, k)
        scale = parts["weight_scale"].float()
        if bits == 8 and weights["symmetric"] and strategy == "channel":
            return Int8WeightOnlyLinear((q - 128).to(torch.int8), scale.reshape(-1), bias)
        group = weights.get("group_size") or k if strategy in ("group", "channel") else None
        if bits == 4 and group in GROUP_SIZES:
            if weights["symmetric"]:
                zero = torch.full_like(scale, INT4_MID)
            else:
                zero = unpack_int32(parts["weight_zero_point"].t().contiguous(), 4, n).t()
                zero = zero.float()
            groups = scale.shape[1]
            q = torch.nn.functional.pad(q.to(torch.uint8), (0, groups * group - k))
            return Int4WeightOnlyLinear.from_quantized(q, scale.reshape(n, groups),
                                                       zero.reshape(n, groups), group, bias, k)
    if fmt == "int-quantized" and bits == 8 and weights["symmetric"] and strategy == "channel":
        weight = parts["weight"].to(torch.int8)
        scale = parts["weight_scale"].float().reshape(-1)
        if inputs is None or inputs.get("dynamic"):
            return W8A8Linear(weight, scale, bias)
        zero = parts.get("input_zero_point")
        return W8A8Linear(weight, scale, bias, parts["input_scale"].float(),
                          None if zero is None else zero.to(torch.int32))
    raise ExportError(f"compressed-tensors scheme {fmt} {weights} has no runtime module here")


def load_compressed_tensors(path: Path) -> nn.Module:
    """A compressed-tensors checkpoint directory as a model on our runtime modules."""
    from transformers import AutoConfig

    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    quant = raw["quantization_config"]
    if quant.get("quantization_status", "compressed") != "compressed":
        raise ExportError("only compressed checkpoints can be imported")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = _skeleton(config)
    tensors: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    ignore = quant.get("ignore") or []
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear)}
    for name, module in linears.items():
        if any(_matches(name, module, target) for target in ignore):
            continue
        for group in quant["config_groups"].values():
            if any(_matches(name, module, t) for t in group.get("targets", [])):
                fmt = group.get("format") or quant["format"]
                parts = {key.removeprefix(f"{name}."): tensor for key, tensor in tensors.items()
                         if key.startswith(f"{name}.")}
                for key in parts:
                    del tensors[f"{name}.{key}"]
                _install(model, name, _ct_module(group, fmt, parts))
                break
    for name, tensor in tensors.items():
        _set_float(model, name, tensor)
    return _finish(model)


# --- GGUF --------------------------------------------------------------------------------

_Q = gguf.GGMLQuantizationType


def _blocks(tensor: Any, size: int) -> np.ndarray:
    rows = int(np.prod(tensor.shape[1:]))
    return np.asarray(tensor.data).reshape(rows, -1, size)


def _q4(tensor: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Codes [N, K] and per-32 scale and zero point [N, K / 32] of a Q4_0 / Q4_1 tensor."""
    q4_1 = tensor.tensor_type == _Q.Q4_1
    blocks = _blocks(tensor, 20 if q4_1 else 18)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0]).float()
    start = 4 if q4_1 else 2
    qs = torch.from_numpy(blocks[..., start:].copy())
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(d.shape[0], -1)
    if q4_1:
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]).float()
        zero = -m / d.clamp_min(1e-30)
    else:
        zero = torch.full_like(d, INT4_MID)
    return q, d, zero


def _q8_rows(tensor: Any) -> tuple[Tensor, Tensor] | None:
    """Codes [N, K] and one scale per row of a Q8_0 tensor, or None when its
    blocks' scales differ within a row (no per-channel layout holds it)."""
    blocks = _blocks(tensor, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if not (d == d[:, :1]).all():
        return None
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(d.shape[0], -1)
    return q, torch.from_numpy(d[:, 0].astype(np.float32))


def _dequantized(tensor: Any) -> Tensor:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(v) for v in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)


def load_gguf_quantized(path: Path) -> nn.Module:
    """A llama GGUF with its Q4_0 / Q4_1 / Q8_0 tensors on our int4 / int8 kernels."""
    from transformers import AutoConfig

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ExportError(f"quantised GGUF import supports llama models, not {arch!r}")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = _skeleton(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    hf_of = {names.get_name(n, try_suffixes=(".weight", ".bias")): n
             for n, _ in model.named_parameters()}
    heads = {"q_proj.weight": config.num_attention_heads,
             "k_proj.weight": config.num_key_value_heads}
    embedding_name = next(n for n, m in model.named_modules()
                          if m is model.get_input_embeddings())
    for tensor in reader.tensors:
        name = hf_of.get(tensor.name)
        if name is None:
            if tensor.name == "output.weight":
                model.config.tie_word_embeddings = False
                name = "lm_head.weight"
            else:
                raise ExportError(f"GGUF tensor {tensor.name!r} has no place in the model")
        module_name = name.removesuffix(".weight")
        # Undo llama.cpp's interleaved rotary row order (see gguf_file).
        rows = torch.arange(int(tensor.shape[-1]))
        for suffix, count in heads.items():
            if name.endswith(suffix):
                rows = torch.argsort(qk_row_order(rows.numel(), count))
        module = _gguf_module(tensor, module_name == embedding_name, rows)
        if module is None:
            _set_float(model, name, _dequantized(tensor)[rows])
        else:
            _install(model, module_name, module)
    if "output.weight" not in {t.name for t in reader.tensors}:
        model.config.tie_word_embeddings = True
    return _finish(model)


def _gguf_module(tensor: Any, embedding: bool, rows: Tensor) -> nn.Module | None:
    """The runtime module holding a quantised tensor's codes (rows in `rows` order),
    or None when its layout has no runtime module."""
    kind = tensor.tensor_type
    if kind in (_Q.Q4_0, _Q.Q4_1) and not embedding:
        q, d, zero = _q4(tensor)
        return Int4WeightOnlyLinear.from_quantized(q[rows], d[rows], zero[rows], BLOCK)
    if kind == _Q.Q8_0:
        codes = _q8_rows(tensor)
        if codes is not None:
            q, scale = codes[0][rows], codes[1][rows]
            if embedding:
                return Int8Embedding(q, scale.to(COMPUTE_DTYPE))
            return Int8WeightOnlyLinear(q, scale, None)
    return None

"""Save and rebuild a quantised model without its float weights.

A GGUF-loaded transformers model cannot `save_pretrained`, and rebuilding a
quantised model by loading the float GGUF again and re-quantising costs ~16 s.
Instead `quantized_state` captures every tensor of the served model plus a plan
(which modules are which runtime kind, with their constructor metadata), and
`build_from_state` instantiates the architecture on the meta device — no
allocation, no random init — swaps in the runtime modules and assigns the
stored tensors directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.conv1d import conv1d_as_linear
from quantizers.errors import QuantizationError
from quantizers.runtime.base import RUNTIME_KINDS, RuntimeModule
from quantizers.runtime.embedding import Int8Embedding
from quantizers.runtime.int8 import Int8WeightOnlyLinear

PLAN_FORMAT = 1
# Plan value of tie_word_embeddings when lm_head shares an Int8Embedding's codes.
TIED_INT8 = "int8"


def quantized_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every tensor needed to rebuild `model` (tied tensors once) and the plan.

    Non-persistent buffers of the architecture (rotary inverse frequencies)
    are included so that a meta-device skeleton needs nothing recomputed;
    runtime modules contribute what their `state_tensors()` hook returns.
    """
    tie = _tie_mode(model)
    head = model.get_output_embeddings() if tie == TIED_INT8 else None
    runtime = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, RuntimeModule) and module is not head
    }
    inside_runtime = {
        f"{name}.{key}"
        for name, module in runtime.items()
        for key, _ in [*module.named_parameters(), *module.named_buffers()]
    }
    tensors: dict[str, Tensor] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in inside_runtime and not (head is not None and _under(name, model, head)):
            tensors[name] = tensor.detach().contiguous()
    for name, module in runtime.items():
        for key, tensor in module.state_tensors().items():
            tensors[f"{name}.{key}"] = tensor.detach().contiguous()
    modules = {
        name: {"kind": type(module).__name__, **module.describe()}
        for name, module in runtime.items()
    }
    floating = {t.dtype for t in model.parameters() if t.is_floating_point()}
    plan = {
        "format": PLAN_FORMAT,
        "dtype": str(next(iter(floating))).removeprefix("torch.") if floating else "bfloat16",
        "modules": modules,
        "tie_word_embeddings": tie,
    }
    return tensors, plan


def _tie_mode(model: nn.Module) -> bool | str:
    """False, True (float weight shared) or TIED_INT8 (int8 codes shared)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out):
        return False
    head, embedding = get_out(), get_in()
    if head is None or getattr(head, "weight", None) is not getattr(embedding, "weight", 0):
        return False
    if isinstance(head, Int8WeightOnlyLinear) and isinstance(embedding, Int8Embedding):
        return TIED_INT8
    return isinstance(head, nn.Linear)


def _under(name: str, model: nn.Module, module: nn.Module) -> bool:
    owner = name.rpartition(".")[0]
    return model.get_submodule(owner) is module if owner else False


def _hf_config(hf_config: Any) -> Any:
    if isinstance(hf_config, Mapping):
        from transformers import AutoConfig

        data = dict(hf_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    return hf_config


def _set_tensor(model: nn.Module, name: str, tensor: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        raise QuantizationError(f"artifact tensor '{name}' has no place in the model")


def _runtime_owner(key: str, owners: Mapping[str, Any]) -> str | None:
    """The runtime module name that `key` lives under, if any (nearest first)."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in owners:
            return prefix
    return None


def build_from_state(
    hf_config: Any, tensors: Mapping[str, Tensor], plan: Mapping[str, Any]
) -> nn.Module:
    """Instantiate the architecture from its config and load a quantized_state.

    `hf_config` is a transformers PretrainedConfig or its to_dict(). Raises
    QuantizationError when the plan is of an unknown format or kind, or when
    the tensors do not cover the model.
    """
    from transformers import AutoModelForCausalLM

    if plan.get("format") != PLAN_FORMAT:
        raise QuantizationError(f"unsupported artifact plan format {plan.get('format')!r}")
    config = _hf_config(hf_config)
    dtype = getattr(torch, str(plan.get("dtype", "bfloat16")))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    conv1d_as_linear(model)
    entries: Mapping[str, Mapping[str, Any]] = plan["modules"]
    own: dict[str, dict[str, Tensor]] = {name: {} for name in entries}
    rest: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        owner = _runtime_owner(key, own)
        if owner is None:
            rest[key] = tensor
        else:
            own[owner][key[len(owner) + 1 :]] = tensor
    for name, entry in entries.items():
        kind = RUNTIME_KINDS.get(str(entry.get("kind")))
        if kind is None:
            raise QuantizationError(f"unknown runtime kind {entry.get('kind')!r} for '{name}'")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, kind.from_state(dict(entry), own[name]))
    for key, tensor in rest.items():
        _set_tensor(model, key, tensor)
    tie = plan.get("tie_word_embeddings")
    if tie == TIED_INT8:
        model.set_output_embeddings(Int8WeightOnlyLinear.tied_to(model.get_input_embeddings()))
    elif tie:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise QuantizationError(f"artifact is missing tensors: {', '.join(missing[:5])}")
    return model.eval()

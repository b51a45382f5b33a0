"""An artifact's tensors as the exporters need them: codes and scales, not kernel layouts.

The runtime modules keep their weights in the layouts of torch's kernels (int4
packed per device, (scale, offset) pairs in bfloat16). Every export format
wants plain integer codes and per-block scales, so this module reads each
module back into one of three neutral forms, with the exact numbers the
kernels use, and leaves float tensors as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.artifacts import Artifact
from quantizers.errors import QuantizationError
from quantizers.packing import INT4_MID
from quantizers.runtime.base import RuntimeModule
from quantizers.runtime.embedding import Int8Embedding
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from quantizers.runtime.w8a8 import W8A8Linear
from quantizers.serialization import build_from_state


class ExportError(QuantizationError):
    """An artifact (or part of it) cannot be written in the requested format."""


@dataclass(frozen=True)
class Int4Weight:
    """w = (q - 8) * scale + offset per group of `group_size` input channels.

    q uint8 [N, K] in 0..15; scale and offset float32 [N, ceil(K / g)], holding
    the kernel's bfloat16 values exactly.
    """

    q: Tensor
    scale: Tensor
    offset: Tensor
    group_size: int

    def dequantize(self) -> Tensor:
        k = self.q.shape[1]
        scale = self.scale.repeat_interleave(self.group_size, dim=1)[:, :k]
        offset = self.offset.repeat_interleave(self.group_size, dim=1)[:, :k]
        return (self.q.float() - INT4_MID) * scale + offset

    def rows(self, order: Tensor) -> Int4Weight:
        return Int4Weight(self.q[order], self.scale[order], self.offset[order], self.group_size)


@dataclass(frozen=True)
class Int8Weight:
    """w = q * scale, q int8 [N, K], scale float32 [N] (one per row).

    `input_scale` / `input_zero` are set for W8A8 with static activations;
    `activations` says whether the module quantised its inputs at all.
    """

    q: Tensor
    scale: Tensor
    activations: str | None = None
    input_scale: Tensor | None = None
    input_zero: Tensor | None = None

    def dequantize(self) -> Tensor:
        return self.q.float() * self.scale[:, None]

    def rows(self, order: Tensor) -> Int8Weight:
        return Int8Weight(self.q[order], self.scale[order], self.activations,
                          self.input_scale, self.input_zero)


ExportTensor = Int4Weight | Int8Weight | Tensor


def dequantize(weight: ExportTensor) -> Tensor:
    """The float32 weight our kernels compute with (before their activation rounding)."""
    if isinstance(weight, Tensor):
        return weight.float()
    return weight.dequantize()


def load_artifact_model(artifact: Artifact) -> nn.Module:
    """The quantised model of an artifact, rebuilt on CPU without float weights."""
    manifest = artifact.manifest
    return build_from_state(manifest["hf_config"], artifact.load_tensors(), manifest["plan"])


def int4_weight(module: Int4WeightOnlyLinear) -> Int4Weight:
    """Codes and the kernel's exact (scale, offset) pairs of an int4 module."""
    q, _, _ = module.unpacked()
    pairs = [sz for sz in (module.scales_and_zeros, module.tail_scales_and_zeros)
             if sz is not None]
    kernel = torch.cat([p.cpu() for p in pairs], dim=0).float()  # [G, Np, 2]
    n = module.out_features
    scale = kernel[..., 0].t()[:n].contiguous()
    offset = kernel[..., 1].t()[:n].contiguous()
    return Int4Weight(q[:, : module.in_features].contiguous(), scale, offset, module.group_size)


def module_weight(module: nn.Module) -> ExportTensor:
    """The exportable form of one weight-bearing module's weight."""
    if isinstance(module, Int4WeightOnlyLinear):
        return int4_weight(module)
    if isinstance(module, Int8WeightOnlyLinear | Int8Embedding):
        return Int8Weight(module.weight.cpu(), module.scale.cpu().float())
    if isinstance(module, W8A8Linear):
        static = module.static
        return Int8Weight(
            module.weight.cpu(), module.weight_scale.cpu().float().reshape(-1),
            activations="static" if static else "dynamic",
            input_scale=module.input_scale.cpu() if static else None,
            input_zero=module.input_zero.cpu() if static else None,
        )
    if isinstance(module, RuntimeModule):
        raise ExportError(f"{type(module).__name__} weights have no equivalent in this format")
    return module.weight.detach().cpu()


def model_weights(model: nn.Module) -> Iterator[tuple[str, ExportTensor]]:
    """(state-dict name, exportable tensor) for every tensor the model computes with.

    Runtime modules yield their weight (and bias) under `<module>.weight`; a
    lm_head tied to the embeddings is left out (the formats express the tie).
    Non-persistent buffers (rotary frequencies) are derived and not exported.
    """
    tied = _tied_head(model)
    seen: set[str] = set()
    for name, module in model.named_modules():
        if module is tied or not name:
            continue
        if isinstance(module, RuntimeModule | nn.Linear | nn.Embedding):
            seen.update(f"{name}.{key}" for key, _ in module.named_parameters())
            seen.update(f"{name}.{key}" for key, _ in module.named_buffers())
            yield f"{name}.weight", module_weight(module)
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                yield f"{name}.bias", bias.detach().cpu()
    tied_prefix = None
    if tied is not None:
        tied_prefix = next(n for n, m in model.named_modules() if m is tied) + "."
    for name, tensor in model.named_parameters():
        if name not in seen and not (tied_prefix and name.startswith(tied_prefix)):
            yield name, tensor.detach().cpu()


def _tied_head(model: nn.Module) -> nn.Module | None:
    """The output projection when it reads the input embedding's own tensor."""
    head: Any = model.get_output_embeddings()
    embedding: Any = model.get_input_embeddings()
    if head is None or embedding is None:
        return None
    return head if getattr(head, "weight", None) is getattr(embedding, "weight", 0) else None

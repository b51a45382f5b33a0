"""How much each linear layer's quantisation alone moves the model's output, measured.

The sensitivity of layer l at a width is KL(p_float ‖ p) when only l is
quantised to that width, measured on a few calibration sequences. Doing that
naively costs a whole forward pass per layer and width (420 for SmolLM2), so
the decoder runs once and every block's input is cached; a layer in block i
then only re-runs blocks i..end and the head, half the decoder on average.
The quantised layer is its dequantised weight written into the model (the
values the int4/int8 kernels compute with) and written back afterwards.

The passes run in the model's own dtype (float32 when quantising from a
float32 load), not bfloat16: any change to a bfloat16 network flips roundings
in every later block, which alone costs ~0.002 nats on SmolLM2 — more than
most layers' int8 error and many layers' int4 error. In float32 an unchanged
layer measures 0 and int8 errors of 3e-5 are resolved.

Memory: the cached block inputs and the reference distributions of the
measured tokens (two float32 [tokens, vocab] tensors: ~75 MiB for
192 tokens of SmolLM2), no copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.errors import ConfigError
from quantizers.methods.block_walk import (
    BlockCall,
    block_output,
    capture_block_inputs,
    decoder_blocks,
)


def measured_kl(reference_logits: Tensor, logits: Tensor) -> float:
    """Mean KL(p_ref ‖ p) per position (nats), from two [..., vocab] logit tensors."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    new = torch.log_softmax(logits.float(), dim=-1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())


@dataclass(frozen=True)
class _Reference:
    """The float model's logits on one call's positions, and what the KL needs of them.

    With d = z - z_ref, KL_t = logsumexp(z) - logsumexp(z_ref) - Σ_v p_v d_v:
    every term is small when the perturbation is, so float32 resolves the
    1e-5-nat KLs of int8 layers. (Σ p log p - Σ p z + logsumexp(z), with no
    difference taken, loses them to cancellation among terms of size ~10.)
    """

    logits: Tensor
    probs: Tensor
    lse: Tensor

    @classmethod
    def of(cls, logits: Tensor) -> _Reference:
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)
        return cls(z, torch.exp(z - lse.unsqueeze(-1)), lse)

    def kl(self, logits: Tensor) -> Tensor:
        """KL per position, [B, T]."""
        z = logits.float()
        shift = (self.probs * (z - self.logits)).sum(-1)
        return torch.logsumexp(z, dim=-1) - self.lse - shift


def _final_norm(parent: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The one norm beside the decoder blocks (`norm`, `ln_f`, `final_layer_norm`...)."""
    norms = [
        module
        for module in parent.children()
        if module is not blocks
        and isinstance(module._parameters.get("weight"), Tensor)
        and module._parameters["weight"].dim() == 1
    ]
    return norms[0] if len(norms) == 1 else None


class _Tail(nn.Module):
    """Final norm, head, and the logit transforms transformers' heads apply
    after it (Granite's `logits_scaling`, Gemma's `final_logit_softcapping`)."""

    def __init__(self, norm: nn.Module, head: nn.Linear, config: Any) -> None:
        super().__init__()
        self.norm = norm
        self.head = head
        self.scaling = float(getattr(config, "logits_scaling", None) or 1.0)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.head(self.norm(hidden)) / self.scaling
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass(frozen=True)
class _Site:
    """Where a layer sits: its block index (None: the head) and its module."""

    block: int | None
    module: nn.Linear


class SensitivityProbe:
    """Measures the KL of the model with one layer's weight replaced, from cached inputs."""

    def __init__(self, model: nn.Module, batches: Sequence[Tensor]) -> None:
        blocks_name, blocks = decoder_blocks(model)
        parent = model.get_submodule(blocks_name.rpartition(".")[0])
        norm = _final_norm(parent, blocks)
        head = model.get_output_embeddings()
        if norm is None or not isinstance(head, nn.Linear):
            raise ConfigError(
                "measuring sensitivities needs a decoder with a final norm and a linear head",
                "method",
            )
        self._model = model
        self._blocks = blocks
        self._blocks_name = blocks_name
        self._head_name = next(n for n, m in model.named_modules() if m is head)
        self._tail = _Tail(norm, head, model.config)
        dtype = head.weight.dtype
        calls = capture_block_inputs(model, blocks, batches, dtype=dtype)
        self._inputs: list[list[BlockCall]] = []
        with torch.no_grad():
            for index, block in enumerate(blocks):
                self._inputs.append(calls)
                calls = [replace(call, hidden=block_output(block, call, index)) for call in calls]
            self._final = [call.hidden for call in calls]
            self._reference = [_Reference.of(self._tail(h)) for h in self._final]
        self.tokens = sum(int(h.shape[0] * h.shape[1]) for h in self._final)

    def _site(self, name: str) -> _Site:
        if name == self._head_name:
            return _Site(None, self._model.get_submodule(name))
        prefix = f"{self._blocks_name}."
        index, _, inner = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not index.isdigit():
            raise ConfigError(f"cannot measure layer {name!r} outside the decoder blocks", "method")
        module = self._blocks[int(index)].get_submodule(inner)
        assert isinstance(module, nn.Linear)
        return _Site(int(index), module)

    def kl_with(self, name: str, weight: Tensor) -> float:
        """Mean KL per token from the model with layer `name`'s weight replaced by `weight`."""
        site = self._site(name)
        original = site.module.weight.data
        site.module.weight.data = weight.to(original.dtype)
        try:
            with torch.no_grad():
                total = 0.0
                for index, reference in enumerate(self._reference):
                    if site.block is None:
                        hidden = self._final[index]
                    else:
                        call = self._inputs[site.block][index]
                        hidden = call.hidden
                        for index in range(site.block, len(self._blocks)):
                            block = self._blocks[index]
                            hidden = block_output(block, replace(call, hidden=hidden), index)
                    total += float(reference.kl(self._tail(hidden)).sum())
        finally:
            site.module.weight.data = original
        return total / self.tokens


def measured_sensitivities(
    model: nn.Module,
    batches: Sequence[Tensor],
    quantised_weights: Mapping[str, Callable[[int], Tensor]],
    widths: Mapping[str, Sequence[int]],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[int, float]]:
    """KL increase (nats per token) of each layer at each of its widths.

    quantised_weights: layer name -> function giving its dequantised weight at
    a width (built on demand, so no more than one layer's is alive at a time).
    progress(done, total) is called after each layer.
    """
    probe = SensitivityProbe(model, batches)
    scores: dict[str, dict[int, float]] = {}
    for done, (name, build) in enumerate(quantised_weights.items(), start=1):
        scores[name] = {bits: max(probe.kl_with(name, build(bits)), 0.0) for bits in widths[name]}
        if progress is not None:
            progress(done, len(quantised_weights))
    return scores

"""How much each linear layer's quantisation alone would move the model's output.

The quantity wanted is KL(p_float ‖ p_quant) when only layer l is quantised to
a given width. Measuring it directly costs one forward pass per layer and
width (420 for SmolLM2's 210 layers at two widths). Instead it is estimated to
second order from one forward and one backward pass per calibration batch:
for a perturbation δ of a layer's outputs,

    KL ≈ ½ δᵀ F δ,   F = E_{y~p}[∇ log p(y) ∇ log p(y)ᵀ]  (the Fisher),

and with labels y_s sampled from the model at each position s of a sequence
and g_t = ∇_{out_t} Σ_s log p(y_s), that is ½ E[(Σ_t g_tᵀ ΔW x_t)²] per
sequence. The sum over positions t must be inside the square: a layer's
errors at different positions add up coherently downstream (through
attention especially), and a per-token sum underestimated v_proj ~5x.
One sampled square is a χ²₁ draw, so each sequence's label positions are split
into interleaved subsets with one backward pass each, every subset an
independent draw. The estimate is additive over layers, the assumption the
bit allocation's knapsack makes anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.methods.block_walk import stack_batches

# Sampled labels use this generator seed so sensitivities are reproducible.
_LABEL_SEED = 1234
# Independent label subsets (backward passes) per calibration batch.
_LABEL_SUBSETS = 4


class _LayerProbe:
    """Keeps a layer's input for the backward pass and scores each perturbation."""

    def __init__(self, module: nn.Linear, deltas: Mapping[int, Tensor]) -> None:
        self.deltas = {bits: delta.to(torch.bfloat16) for bits, delta in deltas.items()}
        self.sums = dict.fromkeys(deltas, 0.0)
        self.tokens = 0
        self._input: Tensor | None = None
        self._handle = module.register_forward_hook(self._forward)

    def _forward(self, _module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        self._input = args[0].detach()
        self.tokens += output.shape[:-1].numel()
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad: Tensor) -> None:
        assert self._input is not None
        x = self._input.to(torch.bfloat16)
        g = grad.to(torch.float32)
        for bits, delta in self.deltas.items():
            per_position = ((x @ delta.T).to(torch.float32) * g).sum(dim=-1)
            per_sequence = per_position.reshape(per_position.shape[0], -1).sum(dim=-1)
            self.sums[bits] += float(per_sequence.pow(2).sum())

    def estimates(self) -> dict[int, float]:
        return {bits: total / 2 / max(self.tokens, 1) for bits, total in self.sums.items()}

    def close(self) -> None:
        self._handle.remove()


def _require_input_grad(_module: nn.Module, _args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Make the embeddings' output a graph leaf, so activations (not weights) get gradients."""
    return output.detach().requires_grad_(True)


def fisher_sensitivities(
    model: nn.Module,
    batches: Sequence[Tensor],
    deltas: Mapping[str, Mapping[int, Tensor]],
) -> dict[str, dict[int, float]]:
    """Estimated KL increase (nats per token) of each layer at each width.

    deltas: layer name -> {bits: quantised weight minus float weight}.
    """
    probes = {name: _LayerProbe(model.get_submodule(name), d) for name, d in deltas.items()}
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(_require_input_grad)
    generator = torch.Generator().manual_seed(_LABEL_SEED)
    was_training = model.training
    model.eval()
    try:
        for ids in stack_batches(batches):
            with torch.enable_grad():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(input_ids=ids, use_cache=False).logits
                log_probs = torch.log_softmax(logits.float(), dim=-1)
                flat = log_probs.reshape(-1, log_probs.shape[-1])
                labels = torch.multinomial(flat.detach().exp(), 1, generator=generator)
                chosen = flat.gather(1, labels).reshape(ids.shape)
                for subset in range(_LABEL_SUBSETS):
                    chosen[:, subset::_LABEL_SUBSETS].sum().backward(
                        retain_graph=subset + 1 < _LABEL_SUBSETS
                    )
    finally:
        handle.remove()
        for probe in probes.values():
            probe.close()
        model.train(was_training)
    return {name: probe.estimates() for name, probe in probes.items()}


def measured_kl(reference_logits: Tensor, logits: Tensor) -> float:
    """Mean KL(p_ref ‖ p) per position (nats), from two [..., vocab] logit tensors."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    new = torch.log_softmax(logits.float(), dim=-1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())

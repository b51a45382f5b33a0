"""The two training phases of `qat`, on a model whose quantised layers are FakeQuantLinear.

Block-wise (EfficientQAT's Block-AP): each decoder block in turn learns to map
the quantised model's inputs to it onto the float block's outputs on the float
model's inputs (squared error relative to each token's norm), so it also
absorbs the error of the blocks before it; then its codes are frozen and its
outputs feed the next block. Only one block's gradients and optimiser state
exist at a time, and the activations of the training sequences are held for
one block (three bfloat16 streams).

End-to-end (EfficientQAT's E2E-QP): with every code frozen, the scales and
offsets of all layers (a group's two numbers per 128 weights) learn to match
the float model's next-token distribution (KL from the teacher's logits, which
come from the same modules switched to their float weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.methods.block_walk import (
    block_output,
    capture_block_inputs,
    compute_in_bf16,
    decoder_blocks,
    run_block,
)
from quantizers.methods.qat_modules import FakeQuantLinear
from quantizers.runtime.base import COMPUTE_DTYPE

# Significant digits kept of each logged loss (the curve goes into the manifest).
_LOSS_DIGITS = 4


@dataclass(frozen=True)
class TrainSettings:
    """What the phases need from the method's config."""

    train: str
    block_steps: int
    e2e_steps: int
    lr: float
    scale_lr: float
    e2e_lr: float
    lr_schedule: str = "constant"


@dataclass
class Progress:
    """Counts optimiser steps; reports step, loss and time left after each.

    `report(step, total, detail)` gets the steps done and planned and a dict
    with the phase, the step's loss and the estimated seconds left; `cancel`
    raises when the job is cancelled. An end-to-end step runs the whole model
    forward twice and backward once, so until one has been timed it is
    estimated at `e2e_cost` block steps.
    """

    steps: dict[str, int]
    e2e_cost: float
    report: Callable[[int, int, dict[str, Any]], None]
    cancel: Callable[[], None]
    done: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.perf_counter)

    @property
    def total(self) -> int:
        return sum(self.steps.values())

    def _seconds_left(self) -> float:
        rates = {phase: self.seconds[phase] / self.done[phase] for phase in self.done}
        if "end_to_end" not in rates and "block" in rates:
            rates["end_to_end"] = rates["block"] * self.e2e_cost
        return sum(
            (self.steps[phase] - self.done.get(phase, 0)) * rates.get(phase, 0.0)
            for phase in self.steps
        )

    def step(self, phase: str, loss: float) -> None:
        now = time.perf_counter()
        self.done[phase] = self.done.get(phase, 0) + 1
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now
        done = sum(self.done.values())
        detail = {
            "phase": phase,
            "step": done,
            "steps": self.total,
            "loss": loss,
            "eta_s": round(self._seconds_left(), 1),
        }
        self.report(done, self.total, detail)
        self.cancel()


@contextmanager
def teacher(layers: Sequence[FakeQuantLinear]) -> Iterator[None]:
    """The layers compute with their float weights: the float model, no copy."""
    for layer in layers:
        layer.teacher = True
    try:
        yield
    finally:
        for layer in layers:
            layer.teacher = False


@contextmanager
def only_trained(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` alone (not the embeddings or norms), restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), torch.autocast("cpu", dtype=COMPUTE_DTYPE, cache_enabled=False):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def lr_scheduler(
    optimiser: torch.optim.Optimizer, steps: int, settings: TrainSettings
) -> torch.optim.lr_scheduler.LRScheduler:
    """Constant rates, or cosine decay to zero over the phase's `steps` (with so
    few steps, the last ones at a small rate let the codes settle instead of
    flipping on each micro-batch's noise)."""
    if settings.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0)


def _rounded(value: float) -> float:
    return float(f"{value:.{_LOSS_DIGITS}g}")


def _block_params(
    layers: Sequence[FakeQuantLinear], settings: TrainSettings
) -> list[dict[str, Any]]:
    groups = []
    if settings.train in ("weights", "both"):
        groups.append({"params": [m.latent for m in layers], "lr": settings.lr})
    if settings.train in ("scales", "both"):
        grid = [m.scale for m in layers] + [m.offset for m in layers if not m.int8]
        groups.append({"params": grid, "lr": settings.scale_lr})
    return groups


@dataclass(frozen=True)
class Layers:
    """The quantised layers by name: which are trained, the float weights
    behind all of them, and how a trained layer's latent weight starts."""

    trained: frozenset[str]
    floats: dict[str, Tensor]
    latent: str

    def install(
        self, model: nn.Module, names: Sequence[str], latent: str | None
    ) -> dict[str, FakeQuantLinear]:
        """Swap the named runtime modules for their training form (trained
        layers with a latent weight unless `latent` is None, others fixed)."""
        fakes = {}
        for name in names:
            fake = FakeQuantLinear.from_runtime(
                model.get_submodule(name),
                self.floats[name],
                latent if name in self.trained else None,
            )
            install(model, name, fake)
            fakes[name] = fake
        return fakes

    def restore(self, model: nn.Module, fakes: dict[str, FakeQuantLinear]) -> None:
        """Swap the training forms back for runtime modules with their codes."""
        for name, fake in fakes.items():
            install(model, name, fake.to_runtime())


def install(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def train_blocks(
    model: nn.Module,
    micro_batches: Sequence[Tensor],
    layers: Layers,
    settings: TrainSettings,
    progress: Progress,
) -> list[list[float]]:
    """Block-wise training; returns each block's loss per step (empty for a
    block without trained layers). Only the block being trained is in its
    training form; the others stay packed runtime modules."""
    _, blocks = decoder_blocks(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    calls = [call for ids in micro_batches for call in capture_block_inputs(model, blocks, [ids])]
    quant_in = [call.hidden for call in calls]
    float_in = quant_in
    curves: list[list[float]] = []
    for index, block in enumerate(blocks):
        base = prefix[id(block)]
        names = [f"{base}.{n}" for n, _ in block.named_modules() if f"{base}.{n}" in layers.floats]
        fakes = layers.install(model, names, layers.latent)
        trained = [fakes[n] for n in names if n in layers.trained]
        with teacher(list(fakes.values())), compute_in_bf16():
            targets = [
                run_block(block, replace(c, hidden=h), index)
                for c, h in zip(calls, float_in, strict=True)
            ]
        curve: list[float] = []
        groups = _block_params(trained, settings) if trained else []
        if groups and settings.block_steps:
            params = [p for g in groups for p in g["params"]]
            optimiser = torch.optim.Adam(groups)
            scheduler = lr_scheduler(optimiser, settings.block_steps, settings)
            with only_trained(model, params):
                for step in range(settings.block_steps):
                    j = step % len(calls)
                    out = block_output(block, replace(calls[j], hidden=quant_in[j]), index)
                    loss = relative_error(out, targets[j])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    scheduler.step()
                    curve.append(_rounded(loss.item()))
                    progress.step("block", curve[-1])
            del optimiser, scheduler
        for fake in fakes.values():
            fake.freeze()
        with compute_in_bf16():
            quant_in = [
                run_block(block, replace(c, hidden=h), index)
                for c, h in zip(calls, quant_in, strict=True)
            ]
        layers.restore(model, fakes)
        float_in = targets
        curves.append(curve)
    return curves


def relative_error(output: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of |output - target|² / |target|².

    Per token, relative to its own size, because the next block sees each
    token through an RMSNorm. A plain MSE is ruled by the few tokens with
    massive activations (SmolLM2's block 11 gives some tokens' residual
    norms far above the rest): after that block it stayed ~13 while every
    block before ended below 0.6, so later blocks would train on a handful
    of tokens.
    """
    diff = (output.float() - target.float()).pow(2).sum(-1)
    return (diff / target.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


def distillation_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean KL(teacher ‖ student) per token, in float32."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def train_end_to_end(
    model: nn.Module,
    micro_batches: Sequence[Tensor],
    layers: Layers,
    settings: TrainSettings,
    progress: Progress,
) -> list[float]:
    """End-to-end training of every trained layer's scales and offsets on
    fixed codes; the loss per step."""
    fakes = layers.install(model, list(layers.floats), None)
    trained = [fakes[n] for n in fakes if n in layers.trained]
    params = [m.scale for m in trained] + [m.offset for m in trained if not m.int8]
    curve: list[float] = []
    optimiser = torch.optim.Adam(params, lr=settings.e2e_lr)
    scheduler = lr_scheduler(optimiser, settings.e2e_steps, settings)
    for step in range(settings.e2e_steps):
        batch = micro_batches[step % len(micro_batches)]
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        # One sequence at a time, gradients accumulated: the logits (a
        # vocabulary's floats per token, several copies for the KL) exist for
        # one sequence, not the whole micro-batch.
        for ids in batch.split(1):
            with teacher(list(fakes.values())), compute_in_bf16():
                reference = model(input_ids=ids, use_cache=False).logits
            with only_trained(model, params):
                loss = distillation_kl(reference, model(input_ids=ids, use_cache=False).logits)
                del reference
                (loss / batch.shape[0]).backward()
            total += loss.item() / batch.shape[0]
        optimiser.step()
        scheduler.step()
        curve.append(_rounded(total))
        progress.step("end_to_end", curve[-1])
    del optimiser, scheduler
    layers.restore(model, fakes)
    return curve

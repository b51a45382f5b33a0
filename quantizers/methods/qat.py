"""`qat`: quantisation-aware training, distilled from the float model.

The start (RTN, GPTQ, feedback or a mixed int4/int8 plan) fixes the format;
its layers are then trained with the quantisation simulated in the forward
pass (quantizers.methods.qat_modules), block by block against the float
block's outputs and then end to end against the float model's logits
(quantizers.methods.qat_train), on the calibration text or on text the float
model generates (quantizers.methods.qat_data). The result is the start's
runtime modules with new codes, scales and offsets: the same kernels, the same
bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from quantizers.errors import ConfigError
from quantizers.methods.block_walk import decoder_blocks
from quantizers.methods.qat_data import cut_sequences, generated_sequences
from quantizers.methods.qat_train import (
    Layers,
    Progress,
    TrainSettings,
    train_blocks,
    train_end_to_end,
)
from quantizers.registry import (
    HEAD_INCLUDED_SKIP,
    MethodConfig,
    QuantContext,
    check_choice,
    check_range,
    get_method,
    register_method,
)
from quantizers.runtime.int4 import GROUP_SIZES, Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear

STARTS = ("rtn", "gptq", "feedback", "mixed")
# Starts whose codes are the float weight rounded to nearest on their grid:
# their latent weight starts at the float weight (see FakeQuantLinear.from_runtime).
_NEAREST_STARTS = frozenset({"rtn", "feedback", "mixed"})
SCHEDULES = ("block", "end_to_end", "block_then_end_to_end")
TRAINED = ("weights", "scales", "both")
DATA = ("calibration", "generated")
LR_SCHEDULES = ("constant", "cosine")
_INT_FIELDS = {
    "block_steps": (0, 100_000),
    "e2e_steps": (0, 100_000),
    "samples": (1, 4096),
    "seq_len": (8, 8192),
    "batch": (1, 256),
    "seed": (0, 2**31 - 1),
}


@dataclass(frozen=True)
class QATConfig(MethodConfig):
    """bits, group_size: the target format (int4 groups of 32/64/128, or int8
    per channel); `{"bits": 4, "group_size": 128}` is int4 g128.
    start: the result training starts from (rtn, gptq, feedback or mixed);
    start_config: further settings of that method (mixed needs its budget,
    e.g. {"target_bits_per_weight": 5.0}; a mixed plan picks each layer's width,
    so `bits` does not apply to it).
    train: what the block-wise phase trains: the latent weights (which moves
    codes), the scales and offsets (LSQ-style learned step sizes), or both.
    schedule: block-wise, end-to-end (scales and offsets of the start's codes),
    or block-wise then end-to-end (EfficientQAT).
    block_steps: optimiser steps per decoder block; e2e_steps: end-to-end steps.
    lr: latent weights' learning rate; scale_lr: scales' and offsets' in the
    block phase; e2e_lr: theirs end to end (Adam).
    lr_schedule: "constant", or "cosine" decay to zero over each block's steps
    and over the end-to-end steps.
    samples, seq_len: training sequences; batch: sequences per step.
    data: "calibration" (the job's calibration text: the bundled one or the
    operator's own file) or "generated" (sampled from the float model).
    seed: for generated text (the calibration cut is deterministic anyway).
    """

    skip: tuple[str, ...] = HEAD_INCLUDED_SKIP
    bits: int = 4
    group_size: int = 128
    start: str = "feedback"
    start_config: Mapping[str, Any] = field(default_factory=dict)
    train: str = "both"
    schedule: str = "block_then_end_to_end"
    block_steps: int = 32
    e2e_steps: int = 16
    lr: float = 2e-4
    scale_lr: float = 2e-4
    e2e_lr: float = 2e-5
    lr_schedule: str = "constant"
    samples: int = 64
    seq_len: int = 256
    batch: int = 4
    data: str = "calibration"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_choice(self.bits, (4, 8), "bits")
        check_choice(self.group_size, GROUP_SIZES, "group_size")
        check_choice(self.start, STARTS, "start")
        check_choice(self.train, TRAINED, "train")
        check_choice(self.schedule, SCHEDULES, "schedule")
        check_choice(self.data, DATA, "data")
        check_choice(self.lr_schedule, LR_SCHEDULES, "lr_schedule")
        for name, (low, high) in _INT_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}", name)
            check_range(value, low, high, name)
        for name in ("lr", "scale_lr", "e2e_lr"):
            check_range(getattr(self, name), 0.0, 1.0, name)
        if not isinstance(self.start_config, Mapping):
            raise ConfigError("start_config must be an object", "start_config")
        object.__setattr__(self, "start_config", dict(self.start_config))
        try:
            self.start_method()
        except ConfigError as exc:
            raise ConfigError(f"start_config: {exc.message}", "start_config") from None

    def start_method(self) -> tuple[str, MethodConfig]:
        """The registered method and config that produce the start."""
        width = (
            {"method": "int8", "config": {}}
            if self.bits == 8
            else {"method": "int4", "config": {"group_size": self.group_size}}
        )
        name, settings = {
            "rtn": (width["method"], width["config"]),
            "gptq": ("gptq", {"bits": self.bits, "group_size": self.group_size}),
            "feedback": ("feedback", {"start": width}),
            "mixed": ("mixed", {"group_size": self.group_size}),
        }[self.start]
        method = get_method(name)
        return name, method.make_config({"skip": self.skip, **settings, **self.start_config})

    def settings(self) -> TrainSettings:
        schedule = self.schedule
        return TrainSettings(
            train=self.train,
            block_steps=self.block_steps if schedule != "end_to_end" else 0,
            e2e_steps=self.e2e_steps if schedule != "block" else 0,
            lr=self.lr,
            scale_lr=self.scale_lr,
            e2e_lr=self.e2e_lr,
            lr_schedule=self.lr_schedule,
        )


def _training_sequences(model: nn.Module, config: QATConfig, ctx: QuantContext) -> Tensor:
    if config.data == "generated":
        return generated_sequences(model, config.samples, config.seq_len, config.seed)
    if not ctx.calibration:
        raise ConfigError('data "calibration" needs calibration text', "data")
    return cut_sequences(ctx.calibration, config.samples, config.seq_len)


def _apply_start(
    model: nn.Module, config: QATConfig, ctx: QuantContext, sequences: Tensor
) -> QuantContext:
    """Apply the start in place on the training sequences; its context lists
    what it quantised."""
    name, start_config = config.start_method()

    start_ctx = QuantContext(model, start_config, list(sequences.split(1)), None, ctx.cancelled)
    get_method(name).apply(model, start_config, start_ctx)
    ctx.extra.update(start_ctx.extra)
    return start_ctx


@register_method("qat", QATConfig, calibrated=True)
def apply_qat(model: nn.Module, config: QATConfig, ctx: QuantContext) -> None:
    # References to the float weights, not copies: the start swaps modules and
    # leaves the float tensors alone, and the teacher passes compute with them.
    floats = {t.name: t.module.weight for t in ctx.targets}
    sequences = _training_sequences(model, config, ctx)
    start_ctx = _apply_start(model, config, ctx, sequences)
    quantised = {
        name: floats[name]
        for name in start_ctx.layers
        if isinstance(model.get_submodule(name), Int4WeightOnlyLinear | Int8WeightOnlyLinear)
    }
    del floats
    # The tied head keeps the start's codes: they also serve the embedding
    # rows, which training the head alone would not see.
    layers = Layers(
        trained=frozenset(quantised) - {ctx.tied_head},
        floats=quantised,
        latent="float" if config.start in _NEAREST_STARTS else "start",
    )
    settings = config.settings()
    micro_batches = list(sequences.split(config.batch))
    trained_blocks = _trained_blocks(model, layers.trained)
    progress = Progress(
        steps={"block": settings.block_steps * trained_blocks, "end_to_end": settings.e2e_steps},
        # Two forwards and a backward through every block, plus the head.
        e2e_cost=1.5 * len(decoder_blocks(model)[1]) + 2,
        report=lambda done, total, detail: ctx.report_progress(
            done * len(ctx.targets) // max(total, 1), len(ctx.targets), detail
        ),
        cancel=ctx.check_cancel,
    )
    block_curves = (
        train_blocks(model, micro_batches, layers, settings, progress)
        if settings.block_steps
        else []
    )
    e2e_curve = (
        train_end_to_end(model, micro_batches, layers, settings, progress)
        if settings.e2e_steps
        else []
    )
    for name in start_ctx.layers:
        ctx.check_cancel()
        ctx.replace(name, model.get_submodule(name), **start_ctx.layers[name])
    ctx.extra["qat"] = {
        "start": config.start_method()[0],
        "data": config.data,
        "sequences": list(sequences.shape),
        "trained_layers": len(layers.trained),
        "block_losses": block_curves,
        "e2e_losses": e2e_curve,
    }


def _trained_blocks(model: nn.Module, trained: frozenset[str]) -> int:
    """How many decoder blocks hold a trained layer."""
    name, blocks = decoder_blocks(model)
    return sum(any(n.startswith(f"{name}.{i}.") for n in trained) for i in range(len(blocks)))

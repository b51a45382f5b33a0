"""`gptq`: second-order error-feedback quantisation (int4 group-wise or int8).

Block by block: the decoder block's linear layers collect input Hessians from
the calibration data as the already-quantised blocks before it deliver it,
each layer is solved by GPTQ (quantizers.methods.gptq_solver) and replaced by
the same runtime module RTN produces, then the quantised block's outputs
become the next block's inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantizers.errors import ConfigError
from quantizers.methods.block_walk import (
    BlockCall,
    advance,
    capture_block_inputs,
    compute_in_bf16,
    decoder_blocks,
    run_block,
    stack_batches,
    working_copy,
)
from quantizers.methods.column_grid import int_grid, rtn_weight
from quantizers.methods.gptq_solver import GPTQSolution, gptq_quantize
from quantizers.methods.hessian import AllInputsSeen, HessianRecorder, output_error
from quantizers.registry import (
    HEAD_INCLUDED_SKIP,
    LayerTarget,
    MethodConfig,
    QuantContext,
    check_choice,
    check_range,
    register_method,
)
from quantizers.runtime.base import QuantizedLinear
from quantizers.runtime.int4 import GROUP_SIZES, Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """bits: 4 (group-wise asymmetric, int4 kernel) or 8 (per-channel, int8 kernel).

    group_size: input channels per int4 group (32, 64, 128; ignored at 8 bits).
    damp: Hessian damping as a fraction of its mean diagonal.
    block_size: columns per lazy-update block (speed only, not the result).
    act_order: visit columns by decreasing input energy, groups fitted up front.

    A tied lm_head (a target under the default skip list) is int8 RTN, as in
    the int4 method: it also serves the embedding's row lookups, which need
    int8 codes, so GPTQ rows count the same bytes as int4 RTN rows.
    """

    skip: tuple[str, ...] = HEAD_INCLUDED_SKIP
    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    block_size: int = 32
    act_order: bool = True

    def validate(self) -> None:
        super().validate()
        check_choice(self.bits, (4, 8), "bits")
        check_choice(self.group_size, GROUP_SIZES, "group_size")
        check_range(self.damp, 1e-6, 1.0, "damp")
        check_choice(self.act_order, (True, False), "act_order")
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or not (1 <= self.block_size <= 4096)
        ):
            raise ConfigError(
                f"block_size must be an integer in 1..4096, got {self.block_size!r}", "block_size"
            )


def min_calibration_tokens(targets: Sequence[LayerTarget]) -> int:
    """Tokens needed for a full-rank Hessian of every target: its input width.

    With fewer tokens than inputs, XᵀX is singular and GPTQ's corrections are
    driven by the damping term rather than the data.
    """
    return max((t.module.in_features for t in targets), default=0)


def check_calibration(batches: Sequence[Tensor], targets: Sequence[LayerTarget]) -> int:
    """The number of calibration tokens, or ConfigError naming the minimum."""
    tokens = sum(int(b.numel()) for b in batches)
    needed = min_calibration_tokens(targets)
    if tokens < needed:
        raise ConfigError(
            f"{tokens} calibration tokens are too few for a stable Hessian: at least "
            f"{needed} are needed (the widest quantised layer has {needed} inputs)",
            "calibration",
        )
    return tokens


def runtime_module(
    solution: GPTQSolution, config: GPTQConfig, linear: nn.Linear
) -> QuantizedLinear:
    """The int4/int8 kernel module RTN would build, from GPTQ's codes."""
    if config.bits == 8:
        return Int8WeightOnlyLinear.from_quantized(
            solution.codes.to(torch.int8), solution.scale[:, 0], None, None, linear.bias
        )
    assert solution.zero is not None
    return Int4WeightOnlyLinear.from_quantized(
        solution.codes.to(torch.uint8),
        solution.scale,
        solution.zero,
        config.group_size,
        linear.bias,
        linear.in_features,
    )


def _solve(weight: Tensor, hessian: Tensor, config: GPTQConfig) -> GPTQSolution:
    grid = int_grid(config.bits, config.group_size)
    return gptq_quantize(
        weight,
        hessian,
        grid,
        damp=config.damp,
        block_size=config.block_size,
        act_order=config.act_order,
    )


def quantize_group(
    ctx: QuantContext,
    group: Sequence[LayerTarget],
    hessian: Tensor,
    working: Mapping[str, nn.Linear],
) -> None:
    """Solve layers sharing one input Hessian, stacked when their configs agree,
    and swap each in (so progress moves layer by layer).

    GPTQ treats output rows independently given H, so q/k/v (or gate/up)
    stacked into one matrix cost one Cholesky and one column sweep. Each
    layer's working copy (`working[name]`, where a later pass needs one) gets
    its dequantised result, never the float layer itself, so the
    block can run on the quantised values with bf16 matmuls (3x faster than
    the int4 kernel at calibration batch sizes) to feed the next block.
    """
    same = all(t.config == group[0].config for t in group)
    batches = [list(group)] if same else [[t] for t in group]
    for batch in batches:
        ctx.check_cancel()
        names = ", ".join(t.name for t in batch)
        with ctx.layer_errors(names):
            config: GPTQConfig = batch[0].config
            weights = [t.module.weight.detach().float() for t in batch]
            solution = _solve(torch.cat(weights), hessian, config)
        row = 0
        for target, weight in zip(batch, weights, strict=True):
            rows = slice(row, row + weight.shape[0])
            row += weight.shape[0]
            part = GPTQSolution(
                codes=solution.codes[rows],
                scale=solution.scale[rows],
                zero=None if solution.zero is None else solution.zero[rows],
                weight=solution.weight[rows],
                proxy_loss=solution.proxy_loss,
                damp=solution.damp,
            )
            k = weight.shape[1]
            info = {
                "output_error": output_error(part.weight[:, :k] - weight, hessian),
                "rtn_output_error": output_error(
                    rtn_weight(weight, config.bits, config.group_size) - weight, hessian
                ),
                "damp": part.damp,
            }
            with ctx.layer_errors(target.name):
                module = runtime_module(part, config, target.module)
            if target.name in working:
                copy_weight = working[target.name].weight
                copy_weight.data = part.weight[:, :k].to(copy_weight.dtype)
            ctx.replace(target.name, module, **info)


def _solve_block(
    ctx: QuantContext,
    block: nn.Module,
    index: int,
    calls: Sequence[BlockCall],
    targets: list[LayerTarget],
) -> nn.Module:
    """Solve and swap in the block's targets; its bf16 working copy holds their results."""
    work = working_copy(block)
    inside = {id(m): n for n, m in block.named_modules()}
    working = {t.name: work.get_submodule(inside[id(t.module)]) for t in targets}
    recorder = HessianRecorder(working, stop_early=True)
    try:
        with torch.no_grad():
            for call in calls:
                ctx.check_cancel()
                with contextlib.suppress(AllInputsSeen):
                    run_block(work, call, index)
                recorder.next_call()
    finally:
        recorder.close()
    by_name = {t.name: t for t in targets}
    for names in recorder.groups([t.name for t in targets]):
        group = [by_name[n] for n in names]
        quantize_group(ctx, group, recorder.hessian_of(names[0]), working)
    return work


def _quantize_outside_blocks(
    ctx: QuantContext, model: nn.Module, batches: Sequence[Tensor], targets: list[LayerTarget]
) -> None:
    """Layers outside the decoder blocks (an opted-in lm_head) after all blocks,
    with Hessians from one pass of the now-quantised model."""
    recorder = HessianRecorder({t.name: t.module for t in targets})
    try:
        with compute_in_bf16():
            for ids in stack_batches(batches):
                ctx.check_cancel()
                model(input_ids=ids, use_cache=False)
                recorder.next_call()
    finally:
        recorder.close()
    for target in targets:
        hessian = recorder.hessian_of(target.name)
        quantize_group(ctx, [target], hessian, {})


@register_method("gptq", GPTQConfig, calibrated=True)
def apply_gptq(model: nn.Module, config: GPTQConfig, ctx: QuantContext) -> None:
    batches = ctx.require_calibration()
    tokens = check_calibration(batches, ctx.targets)
    _, blocks = decoder_blocks(model)
    block_of = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    per_block: list[list[LayerTarget]] = [[] for _ in blocks]
    outside: list[LayerTarget] = []
    for target in ctx.targets:
        index = block_of.get(id(target.module))
        (outside if index is None else per_block[index]).append(target)

    calls = capture_block_inputs(model, blocks, batches)
    for index, block in enumerate(blocks):
        ctx.check_cancel()
        targets = per_block[index]
        work = _solve_block(ctx, block, index, calls, targets) if targets else None
        if index + 1 < len(blocks) and any(per_block[index + 1 :]):
            calls = advance(work if work is not None else working_copy(block), calls, index)
    del calls
    if ctx.tied_head in {t.name for t in outside}:
        tied = next(t for t in outside if t.name == ctx.tied_head)
        outside.remove(tied)
        with ctx.layer_errors(tied.name):
            head = Int8WeightOnlyLinear.from_float(tied.module)
        ctx.replace(tied.name, head)
    if outside:
        _quantize_outside_blocks(ctx, model, batches, outside)

    solved = [layer for layer in ctx.layers.values() if "output_error" in layer]
    gptq_total = sum(layer["output_error"] for layer in solved)
    rtn_total = sum(layer["rtn_output_error"] for layer in solved)
    ctx.extra["gptq"] = {
        "calibration_tokens": tokens,
        "min_calibration_tokens": min_calibration_tokens(ctx.targets),
        "output_error": gptq_total,
        "rtn_output_error": rtn_total,
        "output_error_vs_rtn": gptq_total / rtn_total if rtn_total else None,
    }

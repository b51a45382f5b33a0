"""Where SmoothQuant can fold its factors, found on any architecture.

A smoothing group is a set of linears reading one tensor, and the parameters
that produce that tensor channel by channel: a norm's weight (and bias), or
another linear's rows (and bias) when what lies between is elementwise-linear
in them (Llama's `act(gate) * up` before `down`). Candidates are found by
tracing one short forward (a linear whose input *is* a norm's output; a
linear's sibling with as many outputs as it has inputs), then each is proven
by experiment: dividing the producer's parameters by factors must divide the
consumer's input by the same factors. Gemma's `(1 + weight)` norms, GELU MLPs
and fused projections fail that test and are reported, never smoothed wrongly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_TRACE_TOKENS = 8
# How far (relative to the input's largest value) a proven producer's effect
# may stray from an exact division: rounding of the divided weights only.
_TOLERANCE = 1e-2


@dataclass
class SmoothGroup:
    """Linears sharing one input, and the tensors whose first dim produces it."""

    name: str
    producers: list[Tensor]
    consumers: list[str]


class _Stop(Exception):
    """Ends a traced forward once the consumer's input is seen."""


def _norm_like(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return (
        weight is not None and weight.dim() == 1
        and not isinstance(module, nn.Linear | nn.Embedding)
    )


def _own_tensors(module: nn.Module) -> list[Tensor]:
    return [t for t in (module._parameters.get("weight"), module._parameters.get("bias"))
            if t is not None]


def _sample(model: nn.Module) -> Tensor:
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().num_embeddings)
    return (torch.arange(_TRACE_TOKENS, device=device) * 7919 % vocab)[None]


def _trace(model: nn.Module, ids: Tensor) -> tuple[dict[str, str], list[str]]:
    """For each linear whose input is a norm's output, that norm's name; and
    the linears in the order they run."""
    made_by: dict[int, str] = {}
    held: list[Tensor] = []
    fed_by: dict[str, str] = {}
    order: list[str] = []
    hooks = []

    def on_norm(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, out: object) -> None:
            if isinstance(out, Tensor):
                made_by[id(out)] = name
                held.append(out)  # keeps the id unique while the trace runs

        return hook

    def on_linear(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if name not in order:
                order.append(name)
            producer = made_by.get(id(args[0])) if args else None
            if producer is not None:
                fed_by.setdefault(name, producer)

        return hook

    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            hooks.append(module.register_forward_pre_hook(on_linear(name)))
        elif _norm_like(module):
            hooks.append(module.register_forward_hook(on_norm(name)))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return fed_by, order


def _consumer_input(model: nn.Module, consumer: nn.Module, ids: Tensor) -> Tensor:
    seen: list[Tensor] = []

    def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.append(args[0].detach().float().clone())
        raise _Stop

    handle = consumer.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _divides_input(
    model: nn.Module, producers: list[Tensor], consumer: nn.Module, ids: Tensor
) -> bool:
    """Whether dividing `producers` by per-channel factors divides the
    consumer's input by them (the producers are restored either way)."""
    channels = producers[0].shape[0]
    factors = 0.5 + 1.5 * torch.rand(channels, generator=torch.Generator().manual_seed(0))
    before = _consumer_input(model, consumer, ids)
    saved = [t.detach().clone() for t in producers]
    try:
        for tensor in producers:
            shape = (-1, *([1] * (tensor.dim() - 1)))
            tensor.data.div_(factors.to(tensor.device, tensor.dtype).view(shape))
        after = _consumer_input(model, consumer, ids)
    finally:
        for tensor, original in zip(producers, saved, strict=True):
            tensor.data.copy_(original)
    scale = float(before.abs().max()) or 1.0
    expected = before / factors.to(before.device)
    return float((after - expected).abs().max()) <= _TOLERANCE * scale


def smoothing_plan(model: nn.Module) -> tuple[list[SmoothGroup], dict[str, str]]:
    """The proven groups in the order their consumers run, and for every
    linear smoothing cannot reach, why."""
    ids = _sample(model)
    fed_by, order = _trace(model, ids)
    groups: dict[str, SmoothGroup] = {}
    refused: dict[str, str] = {}
    for name in order:
        consumer = model.get_submodule(name)
        norm_name = fed_by.get(name)
        if norm_name is not None:
            if norm_name in groups:
                groups[norm_name].consumers.append(name)
                continue
            norm = model.get_submodule(norm_name)
            if _divides_input(model, _own_tensors(norm), consumer, ids):
                groups[norm_name] = SmoothGroup(norm_name, _own_tensors(norm), [name])
            else:
                refused[name] = f"its input norm {norm_name} does not scale by its weight"
            continue
        parent_name, _, _ = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        siblings = [
            (f"{parent_name}.{child}" if parent_name else child, module)
            for child, module in parent.named_children()
            if type(module) is nn.Linear and module is not consumer
            and module.out_features == consumer.in_features
        ]
        proven = next(
            (s for s in siblings if _divides_input(model, _own_tensors(s[1]), consumer, ids)),
            None,
        )
        if proven is None:
            refused[name] = "no norm or linear produces its input channel by channel"
        else:
            groups[proven[0]] = SmoothGroup(proven[0], _own_tensors(proven[1]), [name])
    return list(groups.values()), refused


def find_groups(model: nn.Module) -> list[SmoothGroup]:
    """The proven smoothing groups of `model`."""
    return smoothing_plan(model)[0]

"""LoRA on a served model: stacked adapter factors and the per-row low-rank product.

Adapters are applied at *projection groups*: the runner's projections on the
lean path (q/k/v fused into one, gate/up into one, o, down, the head), every
linear module on the general path. For each group that some resident adapter
targets, `LoraSet` holds two float32 stacks over adapter slots (slot 0 is
"no adapter", zeros):

    A: [slots, in, R]      the group's down-projections, side by side
    B: [slots, R, out]     block-diagonal: part i's up-projection (times its
                           scale) lands in that part's output columns

so one product serves a fused group whatever parts each adapter targets.
A call with one adapter for every row (a prefill) computes `(x @ A[s]) @ B[s]`;
a decode step is segmented by adapter: each adapter's rows are gathered and
run as one matmul pair on its stack entry, the deltas added back to their rows
(base rows add nothing), so base and any adapters share the batch, each
adapter's factors are read once per step, and each row's delta has the same
bits whatever else is in the batch (tested).

`LoraState` is the one object the wrappers read: the worker pins the current
set and the rows' slots before each runner call. A wrapper is installed only
on groups some adapter targets, and none while no adapter is resident, so a
server without adapters runs exactly the runner's own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.lora import LoraAdapter
from server.engine.hf_runner import GeneralRunner
from server.engine.llama_runner import LlamaRunner
from server.engine.projections import Projection

GroupKey = tuple[str, ...]  # the module paths of a group's parts, in output order
_LEAN_GROUPS = ("qkv", "o_proj", "gate_up", "down")


class AdapterMismatch(ValueError):
    """An adapter's targets or shapes do not fit the served model; the message says which."""


@dataclass(frozen=True)
class Group:
    key: GroupKey
    in_features: int
    sizes: tuple[int, ...]  # each part's output size


@dataclass(frozen=True)
class LoraSet:
    """Immutable stacks of the resident adapters, by group; `slot_of` maps an
    adapter's uid to its stack entry."""

    slot_of: dict[int, int]
    stacks: dict[GroupKey, tuple[Tensor, Tensor]]


def build_set(
    groups: Sequence[Group], adapters: Sequence[tuple[int, LoraAdapter]], device: torch.device
) -> LoraSet:
    slot_of = {uid: slot for slot, (uid, _) in enumerate(adapters, start=1)}
    slots = len(adapters) + 1
    stacks: dict[GroupKey, tuple[Tensor, Tensor]] = {}
    for group in groups:
        targeted = [[adapter.modules.get(path) for path in group.key] for _, adapter in adapters]
        if not any(m is not None for parts in targeted for m in parts):
            continue
        width = max(sum(m.rank for m in parts if m is not None) for parts in targeted)
        a = torch.zeros(slots, group.in_features, width)
        b = torch.zeros(slots, width, sum(group.sizes))
        for slot, parts in enumerate(targeted, start=1):
            rank_at, column = 0, 0
            for module, size in zip(parts, group.sizes, strict=True):
                if module is not None:
                    r = module.rank
                    a[slot, :, rank_at : rank_at + r] = module.a.T
                    b[slot, rank_at : rank_at + r, column : column + size] = (
                        module.b.T * module.scale
                    )
                    rank_at += r
                column += size
        stacks[group.key] = (a.to(device), b.to(device))
    return LoraSet(slot_of, stacks)


@dataclass(frozen=True)
class _Segment:
    """The rows of one adapter in a decode step: `gather` indexes them, padded to
    at least two rows (see `LoraState.select`), `count` is how many are real."""

    slot: int
    gather: Tensor
    count: int


class LoraState:
    """What the wrappers read during one runner call."""

    def __init__(self) -> None:
        self.current: LoraSet | None = None  # replaced between steps, never during one
        self.single: int | None = None  # a prefill's slot (one sequence, every row)
        self.segments: list[_Segment] = []  # a decode step's rows, by adapter
        self.whole = False  # one segment holding every row, in order
        self.rows: list[int] = []  # a decode step's slot per row (the native step reads it)

    def select(self, uids: Sequence[int | None], *, single: bool) -> None:
        """Pin the slots of the call's sequences (`single`: one sequence, all rows).

        A decode step is segmented by adapter: each adapter's rows run as one
        matmul pair on that adapter's factors. float32 matmuls compute a row
        the same way whatever the row count from two rows up, but one row takes
        another kernel (a matrix-vector product, other rounding): a lone row is
        padded with a copy of itself, so every row's delta has the same bits
        alone and in any batch (tested).
        """
        self.single, self.segments, self.whole, self.rows = None, [], False, []
        current = self.current
        if current is None:
            return
        slots = [0 if uid is None else current.slot_of[uid] for uid in uids]
        if single:
            self.single = slots[0] or None
            return
        self.rows = slots
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                by_slot.setdefault(slot, []).append(row)
        for slot, rows in by_slot.items():
            padded = rows * 2 if len(rows) == 1 else rows
            self.segments.append(_Segment(slot, torch.tensor(padded), len(rows)))
        self.whole = len(by_slot) == 1 and len(next(iter(by_slot.values()))) == len(slots)

    def add(self, key: GroupKey, x: Tensor, out: Tensor) -> Tensor:
        """`out` plus each row's low-rank delta for group `key`."""
        current = self.current
        if current is None or (self.single is None and not self.segments):
            return out
        stacks = current.stacks.get(key)
        if stacks is None:
            return out
        a, b = stacks
        xf = x.reshape(-1, a.shape[1]).float()
        if self.single is not None:
            delta = (xf @ a[self.single]) @ b[self.single]
        elif self.whole:
            segment = self.segments[0]
            rows = xf.index_select(0, segment.gather.to(xf.device))
            delta = ((rows @ a[segment.slot]) @ b[segment.slot])[: segment.count]
        else:
            delta = xf.new_zeros(xf.shape[0], b.shape[2])
            for segment in self.segments:
                gather = segment.gather.to(xf.device)
                part = (xf.index_select(0, gather) @ a[segment.slot]) @ b[segment.slot]
                delta.index_add_(0, gather[: segment.count], part[: segment.count])
        return out + delta.view(out.shape).to(out.dtype)


class LoraProjection:
    """A lean runner's `Projection` plus the group's delta; same call interface."""

    def __init__(self, inner: Projection, key: GroupKey, state: LoraState) -> None:
        self.inner, self.key, self.state = inner, key, state
        self.sizes = inner.sizes

    @property
    def weight_bytes(self) -> int:
        return self.inner.weight_bytes

    def joint(self, x: Tensor) -> Tensor:
        return self.state.add(self.key, x, self.inner.joint(x))

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.joint(x)
        return (out,) if len(self.sizes) == 1 else tuple(out.split(self.sizes, dim=-1))


class LoraLinear(nn.Module):
    """A general-path model's linear module plus its delta (installed in its place)."""

    def __init__(self, base: nn.Module, key: GroupKey, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.key = key
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        return self.state.add(self.key, x, self.base(x))


def _features(module: nn.Module) -> tuple[int, int] | None:
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (int(in_f), int(out_f)) if isinstance(in_f, int) and isinstance(out_f, int) else None


def _get(owner: Any, index: int | str) -> Any:
    return getattr(owner, index) if isinstance(index, str) else owner[index]


def _set(owner: Any, index: int | str, value: Any) -> None:
    if isinstance(index, str):
        setattr(owner, index, value)
    else:
        owner[index] = value


class LoraHooks:
    """The adapter sites of one served model, and the wrappers installed on them."""

    def __init__(self, runner: LlamaRunner | GeneralRunner) -> None:
        self.runner = runner
        self.state = LoraState()
        self.device = runner.device
        self.groups: list[Group] = []
        self.features: dict[str, tuple[int, int]] = {}  # path -> (in, out)
        # Where the runner holds each projection: (its list, index), or (runner, "lm_head").
        self._lean: dict[GroupKey, tuple[Any, int | str]] = {}
        self._general: dict[GroupKey, tuple[nn.Module, str, nn.Module]] = {}
        if isinstance(runner, LlamaRunner):
            self._find_lean(runner)
        else:
            self._find_general(runner.model)
        self._installed: set[GroupKey] = set()

    def _find_lean(self, runner: LlamaRunner) -> None:
        paths = {id(m): name for name, m in runner.model.named_modules()}
        sites: list[tuple[Any, int | str]] = [
            (getattr(runner, n), i) for n in _LEAN_GROUPS for i in range(len(runner.layers))
        ]
        sites.append((runner, "lm_head"))
        for owner, index in sites:
            projection = _get(owner, index)
            key = tuple(paths[id(m)] for m in projection.modules)
            self._add_group(key, int(projection.modules[0].in_features), projection.sizes)
            self._lean[key] = (owner, index)

    def _find_general(self, model: nn.Module) -> None:
        for path, module in model.named_modules():
            features = _features(module)
            if features is None or any(path.startswith(p + ".") for p in self.features):
                continue
            parent, _, attr = path.rpartition(".")
            self._add_group((path,), features[0], [features[1]])
            self._general[(path,)] = (model.get_submodule(parent), attr, module)

    def _add_group(self, key: GroupKey, in_features: int, sizes: Sequence[int]) -> None:
        self.groups.append(Group(key, in_features, tuple(int(s) for s in sizes)))
        for path, size in zip(key, sizes, strict=True):
            self.features[path] = (in_features, int(size))

    def check(self, adapter: LoraAdapter) -> None:
        """Raise `AdapterMismatch` unless every target is a projection of this
        model with the adapter's input and output sizes."""
        for path, module in adapter.modules.items():
            features = self.features.get(path)
            if features is None:
                raise AdapterMismatch(
                    f"the adapter targets {path!r}, which is not a linear projection of the "
                    "served model"
                )
            shape = (int(module.a.shape[1]), int(module.b.shape[0]))
            if shape != features:
                raise AdapterMismatch(
                    f"the adapter's {path!r} maps {shape[0]} -> {shape[1]} features; the "
                    f"served model's maps {features[0]} -> {features[1]}"
                )

    def apply(self, adapters: Sequence[tuple[int, LoraAdapter]]) -> None:
        """Make `adapters` (uid, adapter) the resident set. Runs between steps."""
        if not adapters:
            self.state.current = None
            self._install(set())
            return
        lora_set = build_set(self.groups, adapters, self.device)
        self.state.current = lora_set
        self._install(set(lora_set.stacks))

    def _install(self, keys: set[GroupKey]) -> None:
        for key in self._installed - keys:
            if key in self._lean:
                owner, index = self._lean[key]
                _set(owner, index, _get(owner, index).inner)
            else:
                parent, attr, module = self._general[key]
                setattr(parent, attr, module)
        for key in keys - self._installed:
            if key in self._lean:
                owner, index = self._lean[key]
                _set(owner, index, LoraProjection(_get(owner, index), key, self.state))
            else:
                parent, attr, module = self._general[key]
                setattr(parent, attr, LoraLinear(module, key, self.state))
        self._installed = keys

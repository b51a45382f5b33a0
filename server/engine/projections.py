"""Projections prepared for the runner: fused where exact, prepacked for oneDNN.

At one row per sequence, a decode step is ~210 small matmuls that each stream
a weight from memory; how well each kernel streams decides the speed. Two
preparations, done once per served model, make them stream better:

* **Fusion.** q/k/v and gate/up read the same input, so their weights are
  concatenated along the output axis and run as one matmul each (2 calls
  instead of 5 per layer). Float weights concatenate as they are, and so do
  per-channel int8 codes and scales along N; the CPU int4 kernel's packed
  rows and `[groups, N, 2]` scales do too when every part is a whole number
  of the kernel's 64-row blocks (SmolLM2's are).
* **oneDNN prepacking (bf16 on CPU).** `F.linear` re-reads a plain row-major
  weight every call; reordering it once into oneDNN's blocked layout
  (`mkldnn._reorder_linear_weight`) makes the one-row matmul ~1.5-2x faster
  here, with bit-identical results (the same oneDNN kernel family computes
  both). float32 `F.linear` runs MKL, not oneDNN, so prepacking would change
  its rounding: float32 is fused but not packed.

Every fused or packed projection is checked once against the modules it
replaces on random inputs; a mismatch keeps the modules as they are, so the
prepared path is exact or not used.

**Memory.** A prepared projection *replaces* its modules inside the model
rather than sitting beside them: a fused one is installed as one `FusedPart`
per original module (each a column slice of the shared fused output), a
single packed one as the `PackedLinear` itself. The original modules are then
unreferenced and freed, so preparation adds no weight bytes (a 7B model must
not hold its weights twice), and the model's own forward still works, on the
prepared weights. The one exception is a bf16 head tied to the embedding: the
embedding looks rows up in that weight, which a packed layout cannot serve, so
the packed head is kept beside it (`install=False`). That costs vocab x hidden
bf16 bytes (54 MiB on SmolLM2) and buys ~2x on the largest matmul of a decode
step (the plain head made a SmolLM2 bf16 step ~18% slower here).

A packed weight is an opaque oneDNN tensor that parameter walks cannot read,
so `PackedLinear` carries a zero-byte stand-in parameter of the weight's shape
and dtype: the model's inventory (`param_count`, `weight_bytes`) still counts
the weights it holds in packed form.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers.runtime.base import COMPUTE_DTYPE, QuantizedLinear

# Row counts of the one-off exactness check: decode-like, small batch, and
# prefill-like (int8 switches kernels from 32 rows on).
_CHECK_ROWS = (1, 5, 40)


def can_prepack(weight: Tensor) -> bool:
    """bf16 CPU weights on a build whose oneDNN computes bf16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(nn.Module):
    """A bf16 linear whose weight is reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else _frozen(bias.detach().to(weight.dtype))
        # The weight's shape and dtype on one element of storage: what the model's
        # parameter walks count in place of the opaque packed tensor.
        stand_in = torch.zeros((), dtype=weight.dtype, device=weight.device)
        self.stand_in = _frozen(stand_in.expand(weight.shape))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PlainLinear(nn.Module):
    """A linear over a weight the runner built (a concatenation of several)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.weight = _frozen(weight)
        self.bias = None if bias is None else _frozen(bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class FusedPart(nn.Module):
    """What one original module computed, as columns `start:stop` of a fused one.

    Installed in the model in place of that module, so the model's own forward
    keeps working (computing the whole fusion per part: exact, not fast; the
    runner calls the fused module once instead).
    """

    def __init__(self, fused: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.fused = fused
        self.start, self.stop = start, stop
        self.in_features = int(fused.in_features)
        self.out_features = stop - start

    def forward(self, x: Tensor) -> Tensor:
        return self.fused(x)[..., self.start : self.stop]


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _concat_bias(modules: Sequence[nn.Module], dtype: torch.dtype) -> Tensor | None:
    biases = [getattr(m, "bias", None) for m in modules]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    return torch.cat([
        torch.zeros(m.out_features, dtype=dtype, device=present[0].device) if b is None
        else b.detach().to(dtype)
        for m, b in zip(modules, biases, strict=True)
    ])


def _fuse_float(modules: Sequence[nn.Linear], prepack: bool) -> nn.Module | None:
    first = modules[0].weight
    if any(m.weight.dtype != first.dtype or m.weight.device != first.device for m in modules):
        return None
    weight = torch.cat([m.weight.detach() for m in modules]) if len(modules) > 1 else first.detach()
    bias = _concat_bias(modules, first.dtype)
    if prepack and can_prepack(weight):
        return PackedLinear(weight, bias)
    return PlainLinear(weight, bias) if len(modules) > 1 else None


def _output_axis(tensors: Sequence[Tensor], sizes: Sequence[int]) -> int | None:
    """The axis along which every module's tensor has that module's output size."""
    ndim = tensors[0].dim()
    if any(t.dim() != ndim for t in tensors):
        return None
    for axis in range(ndim):
        others = [t.shape[:axis] + t.shape[axis + 1 :] for t in tensors]
        sized = all(t.shape[axis] == n for t, n in zip(tensors, sizes, strict=True))
        if sized and all(o == others[0] for o in others):
            return axis
    return None


def _fuse_quantized(modules: Sequence[QuantizedLinear]) -> nn.Module | None:
    """One module of the same kind whose per-output-channel buffers are concatenated.

    Works for any weight-only layout that stores its output channels along one
    axis of each buffer (int8 codes and scales, the CPU int4 kernel's packed
    rows and `[groups, N, 2]` scales); buffers without such an axis must be the
    same in every module. Padded outputs would land mid-way, so padding rules
    fusion out. Whatever this builds is still checked for exactness.
    """
    sizes = [int(getattr(m, "padded_out", m.out_features)) for m in modules]
    if any(n != m.out_features for n, m in zip(sizes, modules, strict=True)):
        return None
    # Only the module's own buffers are concatenated: one that keeps its weight
    # elsewhere (bitsandbytes' inner Linear8bitLt) cannot be fused this way.
    if any(len(_tensors(m)) != len(list(m.buffers(recurse=False))) for m in modules):
        return None
    fused = copy.deepcopy(modules[0])
    for name, buffer in modules[0].named_buffers(recurse=False):
        if name == "bias":
            continue
        parts = [getattr(m, name) for m in modules]
        axis = _output_axis(parts, sizes)
        if axis is not None:
            setattr(fused, name, torch.cat(parts, dim=axis))
        elif not all(torch.equal(p, buffer) for p in parts):
            return None
    fused.out_features = sum(sizes)
    if hasattr(fused, "padded_out"):
        fused.padded_out = sum(sizes)
    fused.bias = _concat_bias(modules, COMPUTE_DTYPE)
    return fused


def _build(modules: Sequence[nn.Module], prepack: bool) -> nn.Module | None:
    kinds = {type(m) for m in modules}
    if len(kinds) != 1 or len({getattr(m, "in_features", None) for m in modules}) != 1:
        return None
    kind = kinds.pop()
    if kind is nn.Linear:
        return _fuse_float(modules, prepack)
    if len(modules) == 1 or not issubclass(kind, QuantizedLinear):
        return None
    return _fuse_quantized(modules)


class Projection:
    """Several projections of one input, computed as one prepared matmul when exact.

    Built from the model's modules at `sites` (`(owner, attribute)` pairs);
    when prepared, the prepared module is installed there in their place.
    Called with `[M, K]` activations, returns one `[M, N_i]` tensor per
    original module (views of the fused output when fused).
    """

    def __init__(
        self, sites: Sequence[tuple[nn.Module, str]], *, prepare: bool, dtype: torch.dtype,
        prepack: bool = True, install: bool = True,
    ) -> None:
        """`prepare=False` keeps the modules as they are; `prepack=False` fuses
        without oneDNN packing (inductor cannot trace packed weights);
        `install=False` leaves the model's modules in place and keeps the
        prepared one beside them, for weights the model needs in plain form too."""
        self.modules = [getattr(owner, name) for owner, name in sites]
        self.sizes = [int(m.out_features) for m in self.modules]
        prepared = _build(self.modules, prepack) if prepare else None
        if prepared is not None and not self._matches(prepared, dtype):
            prepared = None
        self.prepared = prepared
        self._replaced: list[weakref.ref[Tensor]] = []
        self.forward: Callable[[Tensor], tuple[Tensor, ...]] = self._separate
        if prepared is not None:
            self._install(sites if install else [], prepared)
            self.forward = lambda x: self._split(prepared(x))

    def _install(self, sites: Sequence[tuple[nn.Module, str]], prepared: nn.Module) -> None:
        """Put the prepared module in the model where the originals were (at no
        sites: nowhere), and keep only weak references to the originals' tensors."""
        own = {id(t) for t in _tensors(prepared)}
        self._replaced = [
            weakref.ref(t) for m in self.modules for t in _tensors(m) if id(t) not in own
        ]
        if not sites:
            return
        if len(sites) == 1:
            parts = [prepared]
        else:
            stops = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes))]
            starts = [0, *stops[:-1]]
            parts = [FusedPart(prepared, a, b) for a, b in zip(starts, stops, strict=True)]
        for (owner, name), part in zip(sites, parts, strict=True):
            setattr(owner, name, part)
        self.modules = parts

    @property
    def weight_bytes(self) -> int:
        """Bytes preparation adds: the replaced modules' tensors that something
        still holds (0 once they are freed, as when serving; a head tied to the
        embedding stays held by it)."""
        alive = [t for t in (ref() for ref in self._replaced) if t is not None]
        return sum(t.numel() * t.element_size() for t in alive)

    @torch.inference_mode()
    def _matches(self, prepared: nn.Module, dtype: torch.dtype) -> bool:
        generator = torch.Generator().manual_seed(0)
        in_features = int(self.modules[0].in_features)
        device = next(iter(self.modules[0].buffers()), None)
        device = device.device if device is not None else next(self.modules[0].parameters()).device
        for rows in _CHECK_ROWS:
            x = torch.randn(rows, in_features, generator=generator).to(dtype).to(device)
            try:
                fused = self._split(prepared(x))
            except RuntimeError:
                return False  # a preparation that cannot run is not exact either
            separate = self._separate(x)
            if not all(torch.equal(a, b) for a, b in zip(fused, separate, strict=True)):
                return False
        return True

    def _split(self, out: Tensor) -> tuple[Tensor, ...]:
        if len(self.sizes) == 1:
            return (out,)
        return tuple(out.split(self.sizes, dim=-1))

    def _separate(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(m(x) for m in self.modules)

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.forward(x)

    def joint(self, x: Tensor) -> Tensor:
        """All outputs side by side, `[M, sum N_i]`: the fused matmul's own output,
        or the modules' outputs concatenated."""
        if self.prepared is not None:
            return self.prepared(x)
        return torch.cat(self._separate(x), dim=-1)

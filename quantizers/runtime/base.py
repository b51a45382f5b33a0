"""Shared base of the runtime modules that replace nn.Linear in a quantised model.

Each subclass registers itself by class name so that serialization.py can
rebuild any of them from an artifact: `describe()` gives the JSON-able
constructor metadata stored in the plan, `from_state()` rebuilds the module
from that metadata and its own tensors without any float weights.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Quantised models compute in bfloat16: torch's CPU int8/int4 kernels take a
# slow generic path for float32 activations (30-200x slower at prefill sizes).
COMPUTE_DTYPE = torch.bfloat16

RUNTIME_KINDS: dict[str, type[RuntimeModule]] = {}

# torch's CPU low-bit kernels read weights with aligned vector loads: an int8
# weight only 8-byte aligned, as a tensor read from a safetensors artifact can
# be, crashed `_weight_int8pack_mm` (SIGSEGV) once the input had several rows.
# Fresh CPU allocations are 64-byte aligned, so such a tensor is copied once.
KERNEL_ALIGNMENT = 64


def kernel_tensor(tensor: Tensor) -> Tensor:
    """`tensor` contiguous and, on CPU, 64-byte aligned (copied only if not)."""
    tensor = tensor.contiguous()
    if tensor.device.type == "cpu" and tensor.data_ptr() % KERNEL_ALIGNMENT:
        tensor = tensor.clone()
    return tensor


class RuntimeModule(nn.Module):
    """A module of a quantised model that serialization.py can save and rebuild."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RUNTIME_KINDS[cls.__name__] = cls

    def describe(self) -> dict[str, Any]:
        """JSON-able constructor metadata, stored in artifact plans and reports."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors from_state() needs, by name relative to this module.

        Default: parameters and persistent buffers (non-persistent ones are
        derived). Modules wrapping a library with its own state layout override it.
        """
        tensors = dict(self.named_parameters())
        for name, buffer in self.named_buffers():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            if attr not in module._non_persistent_buffers_set:
                tensors[name] = buffer
        return tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        """Rebuild from describe() output and this module's state tensors."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())


def _training_weight(module: QuantizedLinear) -> Tensor:
    """The module's weight dequantised to the compute dtype, once, kept on the
    module outside its state (never saved) for as long as the module lives."""
    weight = module.__dict__.get("_training_weight")
    if weight is None:
        weight = module.dequantized_weight().to(COMPUTE_DTYPE)
        module.__dict__["_training_weight"] = weight
    return weight


class _DequantizedWithInputGradient(torch.autograd.Function):
    """A frozen low-bit linear on an input that requires grad (LoRA training on a
    quantised base): `x @ W.T` and `grad @ W`, W being exactly the weight the
    codes hold, dequantised once. A bf16 matmul on it is the kernel's product up
    to accumulation order, and ~15x faster at training's row counts (256 rows
    of SmolLM2's MLP: 0.9 ms against the int4 kernel's 14 ms, 1 thread)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: QuantizedLinear) -> Tensor:
        ctx.module = module
        weight = _training_weight(module)
        bias = None if module.bias is None else module.bias.to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        weight = _training_weight(ctx.module)
        return (grad.to(weight.dtype) @ weight).to(grad.dtype), None


class QuantizedLinear(RuntimeModule):
    """A drop-in nn.Linear replacement holding low-bit weights as buffers.

    Weights are frozen, but an input that requires grad gets one back (the
    kernels have no autograd formula): each subclass's `forward` is wrapped
    once, here; serving (no grad) pays one attribute check and runs the kernel.
    """

    bits: ClassVar[int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kernel = cls.__dict__.get("forward")
        if kernel is None:
            return

        def forward(self: QuantizedLinear, x: Tensor) -> Tensor:
            if x.requires_grad and torch.is_grad_enabled():
                return _DequantizedWithInputGradient.apply(x, self)
            return kernel(self, x)

        cls.forward = forward  # type: ignore[method-assign]

    def dequantized_weight(self) -> Tensor:
        """The float32 `[out, in]` weight the kernel computes with (for gradients)."""
        raise NotImplementedError(f"{type(self).__name__} cannot pass gradients to its input")

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE).clone()
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able constructor metadata, stored in artifact plans and reports."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "bias": self.bias is not None,
        }

    def _finish(self, out: Tensor, lead: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Add the bias and restore the caller's leading dims and dtype."""
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features).to(dtype)


def as_matrix(x: Tensor, k: int) -> tuple[Tensor, tuple[int, ...]]:
    """[..., K] activations -> contiguous [M, K] in the compute dtype, plus leading dims."""
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, k).to(COMPUTE_DTYPE).contiguous(), lead


def check_int8_per_channel(
    q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int | None, kind: str
) -> None:
    """Codes from another method must match the layout of an int8 per-channel module."""
    if zero is not None or group_size is not None:
        raise ValueError(f"{kind} weights are symmetric per channel: no zero or group_size")
    if q.dtype != torch.int8 or scale.shape != (q.shape[0],):
        raise ValueError("expected int8 codes [N, K] and a scale per output channel [N]")

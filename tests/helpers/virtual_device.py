"""A second device for CPU-only machines, to catch device mistakes without a GPU.

A tensor "on the virtual device" is a wrapper that reports the device `vgpu`
(torch's PrivateUse1 backend, renamed, with a Python device guard) but holds a
real CPU tensor, so code that follows the model's device computes
real numbers, while every aten op checks that its tensor arguments sit on one
device, as CUDA would: a tensor created without `device=` (on the CPU) meeting
a model tensor raises `DeviceMismatch` instead of passing silently on a
CPU-only machine. CPU 0-dim tensors may meet virtual ones (torch lets CPU
scalars meet CUDA tensors), and `copy_` may cross devices, as on CUDA.

Fake CUDA tensors (`FakeTensorMode`) cannot stand in here: on a CPU-only build
Python indexing and `clone` of a tensor reporting `cuda` fail for want of a
CUDA device guard, and fake tensors have no values for `.item()`/`.tolist()`,
which an engine step needs. `meta` cannot either: `torch.tensor(data,
device="meta")` drops the data. What vgpu cannot do is make a
`torch.Generator` (that needs a C++ hook), so sampled draws are not run here.

Factory calls (`torch.zeros(..., device=VIRTUAL)`) do not see a tensor
argument, so `VirtualDeviceMode` must be active in every thread that creates
tensors: `with VirtualDeviceMode(): ...`. Moving a model there:
`model._apply(to_virtual)` (what `.to(device)` does, runtime modules' own
`_apply` included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.backend_registration import (
    _DummyBackendModule,
    _setup_privateuseone_for_python_backend,
)


class _Unavailable(_DummyBackendModule):
    """vgpu is no accelerator: FakeTensorMode must keep treating this machine as
    one without any (it would otherwise constant-fold fake CUDA moves for real)."""

    def is_available(self) -> bool:
        return False

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        """What `torch.autocast("vgpu", ...)` (calibration passes) may cast to."""
        return [torch.bfloat16, torch.float16]


if torch._C._get_privateuse1_backend_name() != "vgpu":
    _setup_privateuseone_for_python_backend("vgpu", backend_module=_Unavailable())
    # autocast regions (calibration passes) run uncast on vgpu: devices are
    # what is checked here, not mixed precision.
    _AUTOCAST = torch.library.Library("_", "IMPL")  # held by the module: the fallback lives on
    _AUTOCAST.fallback(torch.library.fallthrough_kernel, dispatch_key="AutocastPrivateUse1")

VIRTUAL = torch.device("vgpu", 0)

# Ops that legitimately take tensors on two devices.
_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}


class DeviceMismatch(RuntimeError):
    """An op got tensors on two devices: on a GPU this would be a crash."""


class OnVirtual(torch.Tensor):
    """A CPU tensor that says it lives on the virtual device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnVirtual:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=VIRTUAL, requires_grad=False,
        )

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"OnVirtual({self.elem!r})"

    def tolist(self) -> Any:  # torch refuses .tolist() on tensor subclasses
        return self.elem.tolist()

    def untyped_storage(self) -> torch.UntypedStorage:  # a wrapper has none of its own
        return self.elem.untyped_storage()

    @classmethod
    def __torch_dispatch__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _run(func, args, kwargs or {})


class VirtualDeviceMode(TorchDispatchMode):
    """Routes factory calls naming the virtual device to real CPU tensors, wrapped."""

    def __enter__(self) -> VirtualDeviceMode:
        # `torch.tensor(data, device=...)` then builds on the CPU and moves the
        # result with `.to(device)`, which this mode sees (as FakeTensorMode does).
        self._lift_cpu_only = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        torch._C._set_only_lift_cpu_tensors(self._lift_cpu_only)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _run(func, args, kwargs or {})


def to_virtual(tensor: torch.Tensor) -> torch.Tensor:
    """A `Module._apply` function moving a tensor to the virtual device."""
    if isinstance(tensor, OnVirtual):
        return tensor
    return OnVirtual(tensor.detach())


def real(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU tensor behind a virtual one."""
    return tensor.elem if isinstance(tensor, OnVirtual) else tensor


def _is_virtual(device: Any) -> bool:
    return device is not None and torch.device(device).type == VIRTUAL.type


def _device_of(value: Any, func: Any) -> str | None:
    if isinstance(value, OnVirtual):
        return "virtual"
    if isinstance(value, torch.Tensor):
        if value.device.type == VIRTUAL.type:
            raise DeviceMismatch(f"{func}: a vgpu tensor made outside VirtualDeviceMode")
        return None if value.dim() == 0 and value.device.type == "cpu" else str(value.device)
    if isinstance(value, torch.Generator):
        return "virtual" if _is_virtual(value.device) else str(value.device)
    return None


def _run(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    flat, spec = tree_flatten((args, kwargs))
    devices = {d for d in (_device_of(v, func) for v in flat) if d is not None}
    if len(devices) > 1 and func not in _CROSS_DEVICE:
        raise DeviceMismatch(f"{func} got tensors on several devices: {sorted(devices)}")
    # A device argument (factory calls, `.to(device)`) decides where the result
    # lives; otherwise it stays with the tensor arguments.
    named = [v for v in flat if isinstance(v, torch.device)]
    wrap = any(_is_virtual(d) for d in named) or (not named and "virtual" in devices)
    wrappers = {id(v.elem): v for v in flat if isinstance(v, OnVirtual)}
    unwrapped = [
        v.elem if isinstance(v, OnVirtual)
        else torch.device("cpu") if isinstance(v, torch.device) and _is_virtual(v)
        else v
        for v in flat
    ]
    call_args, call_kwargs = tree_unflatten(unwrapped, spec)
    out = func(*call_args, **call_kwargs)
    flat_out, out_spec = tree_flatten(out)
    rewrapped = [_rewrap(v, wrappers, wrap) for v in flat_out]
    return tree_unflatten(rewrapped, out_spec)


def _rewrap(value: Any, wrappers: dict[int, OnVirtual], wrap: bool) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if id(value) in wrappers:  # an in-place op returns its (wrapped) input
        return wrappers[id(value)]
    if not wrap:
        return value
    # A view of a normal tensor taken in inference mode is a normal tensor:
    # its wrapper must be one too, or autograd cannot share the version counter.
    with torch.inference_mode(value.is_inference()):
        return OnVirtual(value)


def on_virtual_device(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run under VirtualDeviceMode: for thread targets (modes are per thread)."""

    def run() -> Any:
        with VirtualDeviceMode():
            return fn()

    return run

"""Which device the server computes on, and how much of its memory it may use.

On CUDA, memory is the budget that matters: the KV pool is sized from a
fraction of the device's memory (`--gpu-memory-utilization`, vLLM's setting),
and a quantisation job, which holds a float32 copy of the base model and the
copy it quantises, must find room beside the served model before it starts.
On the CPU there is no such budget (host memory is shared with everything
else), so these helpers answer None / never refuse there.
"""

from __future__ import annotations

import torch
from torch import nn

from quantizers.runtime.base import QuantizedLinear
from quantizers.runtime.embedding import Int8Embedding

# A quantisation job holds the float32 base and the model it quantises (a copy),
# plus calibration activations, Hessians and the quality pass: a quarter more.
_JOB_COPIES = 2
_JOB_MARGIN = 1.25


class InsufficientDeviceMemory(RuntimeError):
    """Not enough free device memory for the work asked; the message says how much."""


def resolve_device(name: str) -> str:
    """`auto` -> `cuda` when a CUDA device is present, else `cpu`; other names as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def memory_info(device: torch.device | str) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device; None off CUDA. Free counts what the
    driver has free plus what torch's caching allocator holds unused (this
    process can reuse it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached, total


def kv_cache_budget(utilization: float, free: int, total: int) -> int:
    """Bytes a KV pool may take so that the process stays within `utilization`
    of the device's memory, given what is in use now (weights, warm-up
    activations, other processes): `utilization * total - (total - free)`."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {utilization}")
    return max(int(utilization * total) - (total - free), 0)


def device_kv_cache_budget(device: torch.device | str, utilization: float) -> int | None:
    """`kv_cache_budget` on the device's memory now; None off CUDA."""
    info = memory_info(device)
    return None if info is None else kv_cache_budget(utilization, *info)


def logical_weights(model: nn.Module) -> int:
    """Weights of the model as a float model would hold them: float parameters
    plus the in x out of every quantised linear and the rows of a quantised
    embedding, each shared matrix once."""
    seen: set[int] = set()
    count = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            count += parameter.numel()
    for module in model.modules():
        if isinstance(module, QuantizedLinear | Int8Embedding):
            weight = getattr(module, "weight", None)
            if weight is not None and id(weight) in seen:
                continue  # a head sharing the embedding's codes
            if weight is not None:
                seen.add(id(weight))
            if isinstance(module, Int8Embedding):
                count += module.num_embeddings * module.embedding_dim
            else:
                count += module.in_features * module.out_features
    return count


def quantization_job_bytes(weights: int) -> int:
    """Device bytes a quantisation job of a model with `weights` weights needs."""
    return int(weights * 4 * _JOB_COPIES * _JOB_MARGIN)


def ensure_free(device: torch.device | str, needed: int, what: str) -> None:
    """Raise InsufficientDeviceMemory when a CUDA device has less than `needed`
    bytes free."""
    info = memory_info(device)
    if info is None:
        return
    free = info[0]
    if free < needed:
        raise InsufficientDeviceMemory(
            f"{what} needs about {needed / 2**30:.2f} GiB of free memory on {device}, "
            f"{free / 2**30:.2f} GiB is free; serve a smaller model or quantise it on a "
            "machine with more device memory"
        )

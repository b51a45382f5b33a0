"""Training a LoRA adapter on a frozen model: float, or quantised on our runtime modules.

Our own loop rather than peft's: peft wraps only module types it knows
(`nn.Linear`, convolutions, embeddings and the quantisation backends it ships
support for) and refuses ours ("Target module Int4WeightOnlyLinear(...) is not
supported"). What training needs from the base is small: the quantised linears
pass gradients to their input (`QuantizedLinear`, through the dequantised
weight), and each target is wrapped with float32 factors `A` (Kaiming-uniform,
as peft initialises it) and `B` (zeros, so step 0 is the base model exactly).

Windows of `seq_len + 1` tokens are drawn at random (seeded) from the training
text; the loss is next-token cross-entropy; AdamW with a linear warm-up over the
first 5% of steps and a cosine decay to 10% of the learning rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers.errors import ConfigError
from quantizers.lora.peft_format import LoraAdapter, LoraModule

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LIMITS = {"rank": (1, 256), "steps": (1, 100_000), "seq_len": (8, 4096), "batch_size": (1, 64)}


class TrainingCancelled(Exception):
    """The caller asked the training to stop."""


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 100
    learning_rate: float = 1e-3
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name, (low, high) in _LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"{name} must be an integer in {low}..{high}, got {value!r}", name
                )
        for name, high in (("alpha", 1e4), ("learning_rate", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number", name)
            if not 0 < value <= high or math.isnan(value):
                raise ConfigError(f"{name} must be in (0, {high}], got {value!r}", name)
        targets = self.target_modules
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                "target_modules must be a non-empty list of module names", "target_modules"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("seed must be an integer", "seed")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = sorted(self.target_modules)
        return data


@dataclass
class TrainResult:
    adapter: LoraAdapter
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class _TrainedLora(nn.Module):
    """A frozen module plus `scale * B @ A @ x` with trainable float32 factors."""

    def __init__(self, base: nn.Module, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        in_features, out_features = int(base.in_features), int(base.out_features)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        device = _device_of(base)
        self.a = nn.Parameter(a.to(device))
        self.b = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        delta = (x.float() @ self.a.T) @ self.b.T * self.scale
        return out + delta.to(out.dtype)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def target_paths(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Paths of the linear modules whose name is one of `targets` (a ConfigError if none)."""
    wanted = set(targets)
    paths = [
        path
        for path, module in model.named_modules()
        if path.rsplit(".", 1)[-1] in wanted
        and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    ]
    if not paths:
        raise ConfigError(
            f"no linear module of the model is named one of {sorted(wanted)}", "target_modules"
        )
    return paths


def _learning_rate(config: LoraTrainConfig, step: int) -> float:
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_lora(
    model: nn.Module,
    tokens: Tensor,
    config: LoraTrainConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train an adapter for `model` (frozen; its targets wrapped during training and
    put back after) on the 1-D token ids `tokens`."""
    if tokens.numel() < config.seq_len + 1:
        raise ConfigError(
            f"the training text has {tokens.numel()} tokens, fewer than "
            f"seq_len + 1 = {config.seq_len + 1}",
            "seq_len",
        )
    generator = torch.Generator().manual_seed(config.seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped: dict[str, tuple[nn.Module, str, _TrainedLora]] = {}
    for path in target_paths(model, config.target_modules):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        lora = _TrainedLora(getattr(parent, attr), config.rank, config.scale, generator)
        setattr(parent, attr, lora)
        wrapped[path] = (parent, attr, lora)
    params = [p for _, _, lora in wrapped.values() for p in (lora.a, lora.b)]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, fused=True)
    device = params[0].device
    was_training = model.training
    model.eval()  # no dropout: the frozen model computes what it serves
    result = TrainResult(LoraAdapter({}))
    started = time.perf_counter()
    try:
        for step in range(config.steps):
            if should_cancel is not None and should_cancel():
                raise TrainingCancelled
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            starts = torch.randint(
                0, tokens.numel() - config.seq_len, (config.batch_size,), generator=generator
            )
            batch = torch.stack([tokens[s : s + config.seq_len + 1] for s in starts]).to(device)
            with torch.enable_grad():
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, result.losses[-1])
    finally:
        for parent, attr, lora in wrapped.values():
            setattr(parent, attr, lora.base)
        model.train(was_training)
    result.seconds = time.perf_counter() - started
    modules = {
        path: LoraModule(lora.a.detach().float().cpu(), lora.b.detach().float().cpu(), config.scale)
        for path, (_, _, lora) in wrapped.items()
    }
    config_json = {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "target_modules": sorted(config.target_modules),
    }
    result.adapter = LoraAdapter(modules, config_json)
    return result

"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

An adapter adds `scale * B @ A @ x` to a linear module's output, with
`A` `[r, in]`, `B` `[out, r]` and `scale = alpha / r` (`alpha / sqrt(r)` with
rsLoRA). PEFT stores them under `base_model.model.<module path>.lora_A.weight`
and `.lora_B.weight`; the config names the targets, alpha, and per-module
overrides (`alpha_pattern`, `rank_pattern`, whose keys match a module path's
tail). What changes a model beyond a low-rank product on linear layers (DoRA,
trained biases, `modules_to_save`, embedding adapters) is refused, naming the
field, rather than served wrongly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# `<path>.lora_A.weight`, or `<path>.lora_A.<adapter name>.weight` as PEFT keeps it in memory.
_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight")


class AdapterFormatError(ValueError):
    """The directory is not a LoRA adapter this server can apply; the message says why."""


@dataclass(frozen=True)
class LoraModule:
    """One target's factors: output += scale * (x @ a.T) @ b.T."""

    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LoraAdapter:
    """Every target module's factors, by module path in the base model."""

    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        """The module names it targets (the last component of each path)."""
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})


def _pattern_value(patterns: dict[str, Any], path: str, default: float) -> float:
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return float(value)
    return default


def _check_config(config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "adapters with modules_to_save (fully trained modules) are not "
        "supported",
        "trainable_token_indices": "adapters that train token embeddings are not supported",
    }
    for name, message in refused.items():
        if config.get(name):
            raise AdapterFormatError(f"{message} ({name})")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(
            f"bias={config['bias']!r}: adapters with trained biases are not supported"
        )
    if "lora_alpha" not in config:
        raise AdapterFormatError(f"{CONFIG_FILE} has no lora_alpha")


def read_adapter(directory: Path) -> LoraAdapter:
    """The adapter stored in `directory`, its factors in float32 on the CPU."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory} is not a directory")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFormatError(f"{directory} has no {path.name}")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} is not a JSON object")
    _check_config(config)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise AdapterFormatError(f"{WEIGHTS_FILE} cannot be read: {exc}") from exc
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(_PREFIX))
        if match is None:
            raise AdapterFormatError(
                f"tensor {key!r} is not a LoRA factor of a linear module (embedding adapters "
                "and saved modules are not supported)"
            )
        parts.setdefault(match["path"], {})[match["part"]] = tensor
    if not parts:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no LoRA factors")
    alpha = float(config["lora_alpha"])
    alphas = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for path, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(
                f"module {path!r} has lora_{'A' if 'B' in pair else 'B'} missing"
            )
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterFormatError(
                f"module {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                "[r, in] and [out, r]"
            )
        rank = int(a.shape[0])
        module_alpha = _pattern_value(alphas, path, alpha)
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        modules[path] = LoraModule(a.float().contiguous(), b.float().contiguous(), scale)
    return LoraAdapter(modules, config)


def write_adapter(adapter: LoraAdapter, directory: Path, *, base_model: str | None = None) -> None:
    """Save in PEFT's format (loadable by `peft.PeftModel.from_pretrained`).

    Every module is written with the adapter's rank in `r` and its own rank in
    `rank_pattern` where that differs; alpha is chosen so PEFT recomputes each
    module's scale (rsLoRA off).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank = adapter.rank
    first = next(iter(adapter.modules.values()))
    alpha = first.scale * first.rank
    rank_pattern = {
        re.escape(path): m.rank for path, m in adapter.modules.items() if m.rank != rank
    }
    alpha_pattern = {
        re.escape(path): m.scale * m.rank
        for path, m in adapter.modules.items()
        if not math.isclose(m.scale * m.rank, alpha)
    }
    config = {
        **{k: v for k, v in adapter.config.items() if k not in ("rank_pattern", "alpha_pattern")},
        "peft_type": "LORA",
        "task_type": adapter.config.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model or adapter.config.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": adapter.target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": adapter.config.get("lora_dropout", 0.0),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors: dict[str, Tensor] = {}
    for path, module in adapter.modules.items():
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = module.a.detach().float().contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = module.b.detach().float().contiguous()
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

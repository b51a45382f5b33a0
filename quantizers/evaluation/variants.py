"""Which model variants one `quantserve eval` run measures.

The float32 model and its bf16 cast are always measured in the same run: every
ratio in the table is against float32 measured minutes apart on the same
machine, and bf16 separates what the bf16 compute dtype of the quantised
kernels gives from what the quantisation itself gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FLOAT32 = "float32"
BF16 = "bf16"
BASELINE_ALIASES = {"float", FLOAT32, BF16}


class VariantSpecError(ValueError):
    """A `--method` or `--config` value that cannot be parsed."""


@dataclass(frozen=True)
class Variant:
    method: str
    config: dict[str, Any] | None = field(default=None)

    @property
    def is_baseline(self) -> bool:
        return self.method in (FLOAT32, BF16)

    @property
    def label(self) -> str:
        """`int4 group_size=64`: the method and the config values it was given."""
        if not self.config:
            return self.method
        parts = [
            f"{key}={value}" if not isinstance(value, dict | list) else
            f"{key}={json.dumps(value, separators=(',', ':'))}"
            for key, value in self.config.items()
        ]
        return f"{self.method} {' '.join(parts)}"


def parse_config(text: str | None) -> dict[str, Any] | None:
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VariantSpecError(f"config is not valid JSON ({exc.msg}): {text}") from None
    if not isinstance(value, dict):
        raise VariantSpecError(f"config must be a JSON object: {text}")
    return value


def _split(value: str) -> list[str]:
    """`int8,int4` lists several methods; `int4:{"group_size": 64}` is one
    method with its own config, whose JSON commas do not split it."""
    if ":" in value:
        return [value]
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_variants(values: list[str], default_config: dict[str, Any] | None) -> list[Variant]:
    """Baselines first, then each method in the order given (duplicates once).

    `default_config` (`--config`) applies to every method given without an
    inline `:JSON` config.
    """
    variants = [Variant(FLOAT32), Variant(BF16)]
    for value in values:
        for item in _split(value):
            name, _, inline = item.partition(":")
            name = name.strip()
            if not name:
                raise VariantSpecError(f"empty method name in '{value}'")
            if name in BASELINE_ALIASES:
                continue
            variant = Variant(name, parse_config(inline) if inline else default_config)
            if variant not in variants:
                variants.append(variant)
    return variants

"""`bnb-int8` (LLM.int8() with an outlier threshold) and `bnb-nf4` via bitsandbytes.

bitsandbytes may be missing, or unable to run on the machine (its fast CPU
4-bit kernel is downloaded at import and is absent offline; its slow fallback
works). Whether it runs is probed once, on a tiny layer, when a request first
asks for one of these methods, and a failure is reported as
MethodUnavailableError with the reason rather than surfacing midway.

Unlike `int8` and `int4`, these keep lm_head out by default (DEFAULT_SKIP):
bitsandbytes modules cannot serve the embedding's row lookups, so quantising a
tied head would leave the float embedding in place and store the matrix twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from quantizers.errors import MethodUnavailableError
from quantizers.registry import (
    LayerTarget,
    MethodConfig,
    QuantContext,
    check_choice,
    check_range,
    register_method,
)
from quantizers.runtime.bnb import BnbInt8Linear, BnbNF4Linear

NF4_BLOCK_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class BnbInt8Config(MethodConfig):
    """threshold: activation magnitude above which a column is computed in float
    (LLM.int8()'s outlier decomposition); 0 disables it."""

    threshold: float = 6.0

    def validate(self) -> None:
        super().validate()
        check_range(self.threshold, 0.0, 1e4, "threshold")


@dataclass(frozen=True)
class BnbNF4Config(MethodConfig):
    """blocksize: weights sharing one absmax scale; double_quant: quantise those
    scales too (about 0.4 bits per weight saved)."""

    blocksize: int = 64
    double_quant: bool = True

    def validate(self) -> None:
        super().validate()
        check_choice(self.blocksize, NF4_BLOCK_SIZES, "blocksize")
        check_choice(self.double_quant, (True, False), "double_quant")


@lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why bitsandbytes cannot run here, or None when a tiny int8 and NF4 layer work."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc}); " \
            "install the 'bnb' extra"
    probe = nn.Linear(64, 64)
    x = torch.ones(2, 64)
    try:
        with torch.no_grad():
            for module in (BnbInt8Linear.from_float(probe), BnbNF4Linear.from_float(probe)):
                if not bool(torch.isfinite(module(x)).all()):
                    return "bitsandbytes produced non-finite outputs on this machine"
    except Exception as exc:
        return f"bitsandbytes cannot run on this machine ({type(exc).__name__}: {exc})"
    return None


def require_bitsandbytes() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise MethodUnavailableError(reason, "method")


@register_method("bnb-int8", BnbInt8Config)
def apply_bnb_int8(model: nn.Module, config: BnbInt8Config, ctx: QuantContext) -> None:
    require_bitsandbytes()

    def build(target: LayerTarget) -> nn.Module:
        return BnbInt8Linear.from_float(target.module, target.config.threshold)

    ctx.quantize_layers(build)


@register_method("bnb-nf4", BnbNF4Config)
def apply_bnb_nf4(model: nn.Module, config: BnbNF4Config, ctx: QuantContext) -> None:
    require_bitsandbytes()

    def build(target: LayerTarget) -> nn.Module:
        return BnbNF4Linear.from_float(
            target.module, target.config.blocksize, target.config.double_quant
        )

    ctx.quantize_layers(build)

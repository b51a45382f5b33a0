"""`quantserve serve` with one extra, test-only quantisation method that fails midway.

The fault is injected through configuration, not a flag in the server: this
entry point registers `fault-midway` with the quantizer registry and then runs
the ordinary CLI, so `POST /admin/quantize {"method": "fault-midway",
"config": {"fail_after": 3}}` quantises three real layers with int8 and raises
on the fourth, in the job worker, exactly where a real method would fail.
Production servers never import this module.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from quantizers.registry import LayerTarget, MethodConfig, QuantContext, register_method
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from server.cli import main

FAULT_METHOD = "fault-midway"
FAULT_MESSAGE = "injected fault"


@dataclass(frozen=True)
class FaultMidwayConfig(MethodConfig):
    """How many layers quantise before the injected failure."""

    fail_after: int = 1


@register_method(FAULT_METHOD, FaultMidwayConfig)
def apply_fault_midway(model: nn.Module, config: FaultMidwayConfig, ctx: QuantContext) -> None:
    def build(target: LayerTarget) -> nn.Module:
        if ctx.done >= config.fail_after:
            raise RuntimeError(f"{FAULT_MESSAGE} after {ctx.done} layers")
        return Int8WeightOnlyLinear.from_float(target.module)

    ctx.quantize_layers(build)


if __name__ == "__main__":
    sys.exit(main())

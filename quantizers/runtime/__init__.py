"""Runtime nn.Modules whose forward runs a real low-bit kernel."""

from quantizers.runtime.base import COMPUTE_DTYPE, RUNTIME_KINDS, QuantizedLinear
from quantizers.runtime.bnb import BnbInt8Linear, BnbNF4Linear
from quantizers.runtime.int4 import Int4WeightOnlyLinear
from quantizers.runtime.int8 import Int8WeightOnlyLinear
from quantizers.runtime.w8a8 import W8A8Linear

__all__ = [
    "COMPUTE_DTYPE",
    "RUNTIME_KINDS",
    "BnbInt8Linear",
    "BnbNF4Linear",
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyLinear",
    "QuantizedLinear",
    "W8A8Linear",
]

"""quantizers: turn a loaded transformers causal LM into a quantised one.

A library with no web code: the server and the CLI both use it. Start with
`quantize(model, "int8")` and `list_methods()`.
"""

from quantizers.errors import (
    ConfigError,
    LayerQuantizationError,
    MethodUnavailableError,
    QuantizationCancelled,
    QuantizationError,
)
from quantizers.registry import QuantReport, get_method, list_methods, quantize

__all__ = [
    "ConfigError",
    "LayerQuantizationError",
    "MethodUnavailableError",
    "QuantReport",
    "QuantizationCancelled",
    "QuantizationError",
    "get_method",
    "list_methods",
    "quantize",
]

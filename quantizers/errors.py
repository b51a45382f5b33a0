"""Typed errors of the quantizers library.

The server maps every QuantizationError to a 4xx response that names the config
field at fault (`param`), so callers never have to parse messages. A failure in
the middle of a model raises LayerQuantizationError naming the layer, so the
caller can discard the half-quantised model and say where it broke.
"""

from __future__ import annotations


class QuantizationError(Exception):
    """Base of every error the library raises on purpose.

    `param` is the config field (or request field) at fault, or None when the
    error is not about one field.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(QuantizationError):
    """An invalid method name, config value or calibration source."""


class MethodUnavailableError(QuantizationError):
    """The method is valid but cannot run on this machine (missing package or device)."""


class LayerQuantizationError(QuantizationError):
    """Quantising one layer failed; `layer` is its module name in the model."""

    def __init__(self, layer: str, message: str, param: str | None = None) -> None:
        super().__init__(f"layer '{layer}': {message}", param)
        self.layer = layer


class QuantizationCancelled(Exception):
    """The caller's should_cancel() turned true; the model is partially quantised."""

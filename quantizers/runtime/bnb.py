"""Runtime wrappers around bitsandbytes' LLM.int8() and NF4 linears.

bitsandbytes keeps part of its state outside parameters (the int8 row scales
`SCB`, the NF4 `quant_state`), so these wrappers implement `state_tensors()`
and `from_state()` to (de)serialise it. bitsandbytes is imported only when a
module is built: importing it is slow and may fail on machines without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantizers.primitives import pad_to_multiple
from quantizers.runtime.base import COMPUTE_DTYPE, QuantizedLinear, as_matrix

# Separator replacing '.' in bitsandbytes' quant_state keys inside our names.
_KEY_DOT = "__dot__"


def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


class BnbInt8Linear(QuantizedLinear):
    """LLM.int8(): int8 weights, activation columns above `threshold` in float."""

    bits = 8

    def __init__(
        self, weight: Tensor, scb: Tensor, bias: Tensor | None, threshold: float
    ) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, None)
        bnb = _bnb()
        self.threshold = threshold
        inner = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False,
            threshold=threshold, device="meta",
        )
        inner.weight = bnb.nn.Int8Params(
            weight.to(torch.int8), requires_grad=False, has_fp16_weights=False,
            CB=weight, SCB=scb.float(),
        )
        if bias is not None:
            inner.bias = nn.Parameter(bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
        self.inner = inner

    @classmethod
    def from_float(cls, linear: nn.Linear, threshold: float = 6.0) -> Self:
        """Row-wise absmax int8 quantisation by bitsandbytes itself."""
        bnb = _bnb()
        weight = linear.weight.detach().to(torch.float16).contiguous()
        codes, row_scale, _ = bnb.functional.int8_vectorwise_quant(weight)
        return cls(codes, row_scale, linear.bias, threshold)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        """Move the row scales and the matmul state with the weight: `_apply`
        swaps the weight's data only, leaving bitsandbytes' side tensors behind
        (its own `Linear8bitLt.to` moves them, but a model's `.to` never calls it)."""
        super()._apply(fn, recurse)
        weight, state = self.inner.weight, self.inner.state
        if weight.SCB is not None:
            weight.SCB = weight.SCB.to(weight.device)
        if state.SCB is not None:
            state.SCB = state.SCB.to(weight.device)
        if state.CB is not None:
            state.CB = weight.data
        return self

    def state_tensors(self) -> dict[str, Tensor]:
        # the first forward moves the row scales from the weight into the matmul state
        scb = self.inner.weight.SCB
        tensors = {
            "weight": self.inner.weight.data,
            "scb": scb if scb is not None else self.inner.state.SCB,
        }
        if self.inner.bias is not None:
            tensors["bias"] = self.inner.bias.data
        return tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        return cls(tensors["weight"], tensors["scb"], tensors.get("bias"), float(meta["threshold"]))

    def describe(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "bias": self.inner.bias is not None,
            "threshold": self.threshold,
        }

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = as_matrix(x, self.in_features)
        out = self.inner(x2)
        return out.reshape(*lead, self.out_features).to(x.dtype)


class BnbNF4Linear(QuantizedLinear):
    """NF4 weights in blocks with absmax scales, optionally double-quantised.

    The input size is zero-padded to a multiple of the block size: bitsandbytes'
    CPU path gives wrong results (25% error instead of 9%) when blocks straddle
    weight rows, which SmolLM2's 576 inputs would do with blocks of 128.
    """

    bits = 4

    def __init__(
        self,
        packed: Tensor,
        quant_state: dict[str, Tensor],
        in_features: int,
        out_features: int,
        bias: Tensor | None,
        padded_in: int,
    ) -> None:
        super().__init__(in_features, out_features, None)
        bnb = _bnb()
        self.padded_in = padded_in
        inner = bnb.nn.Linear4bit(
            padded_in, out_features, bias=bias is not None, compute_dtype=COMPUTE_DTYPE,
            quant_type="nf4", device="meta",
        )
        inner.weight = bnb.nn.Params4bit.from_prequantized(
            packed, dict(quant_state), device=packed.device, module=inner
        )
        if bias is not None:
            inner.bias = nn.Parameter(bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
        # bitsandbytes would repack the weight for its CPU kernel on the first
        # eval forward; that kernel is fetched from a hub (absent offline) and the
        # repacking fails when the block size does not divide the input size.
        inner.support_avx512bf16_for_cpu = False
        self.inner = inner
        # registered so that weight_bytes counts the block scales; shared, not copied
        for key, tensor in quant_state.items():
            self.register_buffer(f"state_{key.replace('.', _KEY_DOT)}", tensor)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True
    ) -> Self:
        """NF4 quantisation by bitsandbytes, from the weight in the compute dtype."""
        bnb = _bnb()
        weight = pad_to_multiple(linear.weight.detach().to(COMPUTE_DTYPE), blocksize, dim=1)
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
            quant_type="nf4",
        )
        return cls(
            packed, state.as_dict(packed=True), linear.in_features, linear.out_features,
            linear.bias, weight.shape[1],
        )

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {"packed": self.inner.weight.data}
        tensors.update({n: b for n, b in self.named_buffers() if n.startswith("state_")})
        if self.inner.bias is not None:
            tensors["bias"] = self.inner.bias.data
        return tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        state = {
            k.removeprefix("state_").replace(_KEY_DOT, "."): v
            for k, v in tensors.items()
            if k.startswith("state_")
        }
        return cls(
            tensors["packed"], state, int(meta["in_features"]), int(meta["out_features"]),
            tensors.get("bias"), int(meta["padded_in"]),
        )

    def describe(self) -> dict[str, Any]:
        quant_state = self.inner.weight.quant_state
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "bias": self.inner.bias is not None,
            "padded_in": self.padded_in,
            "blocksize": int(quant_state.blocksize),
            "double_quant": bool(quant_state.nested),
        }

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = as_matrix(x, self.in_features)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        out = self.inner(x2)
        return out.reshape(*lead, self.out_features).to(x.dtype)

"""Keys and values in int8: symmetric codes with one scale per token and head.

A cached key or value row (`head_dim` numbers of one token and one KV head) is
stored as `round(x / scale)` in [-127, 127] with `scale = max|x| / 127` kept in
float16 beside it. Per row, because keys have a few large channels whose size
differs a lot between tokens and heads, and a row is what is written at once
(so writing never rescales neighbours). float16 scales keep 11 significant bits
at 2 bytes: a 64-wide row costs 66 bytes instead of 128 in bf16.

The server's paged pool stores these codes; `quantserve eval --kv-cache-dtype
int8` applies the same round trip to measure what it costs in quality.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8")
SCALE_DTYPE = torch.float16
# Below float16's smallest subnormal a scale would round to 0 and divide by it.
_MIN_SCALE = 2.0**-24


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes shaped like `x` and float16 scales `x.shape[:-1]`."""
    x = x.float()
    scales = (x.abs().amax(dim=-1) / 127.0).clamp_min(_MIN_SCALE).to(SCALE_DTYPE)
    codes = torch.round(x / scales.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows in `dtype` from codes and scales (products in float32, rounded once)."""
    return (codes.float() * scales.float().unsqueeze(-1)).to(dtype)


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as the int8 cache gives it back."""
    return dequantize_rows(*quantize_rows(x), x.dtype)


def row_bytes(head_dim: int, kv_cache_dtype: str, dtype: torch.dtype) -> int:
    """Bytes one token's row of one head takes in the cache."""
    if kv_cache_dtype == "int8":
        return head_dim + torch.empty((), dtype=SCALE_DTYPE).element_size()
    return head_dim * torch.empty((), dtype=dtype).element_size()

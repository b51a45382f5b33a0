"""The model as it computes over an int8 KV cache, for perplexity and KL.

The server's int8 pool (`--kv-cache-dtype int8`) stores every key and value
row as int8 codes and a scale (`quantizers/kv_int8.py`) and attention reads
them back from there. `Int8KVModel` runs a whole window through the model's
own forward with a cache whose `update()` hands attention each layer's keys
and values after that same round trip, so every position attends over keys and
values as the pool would give them back: what a token decoded at that position
sees (a prefill from scratch attends over its own fresh keys, so it sees less
error: this is the upper bound). `compare(base, Int8KVModel(base), ...)` is
then the int8 cache's cost in the terms weight methods are reported in.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import Cache

from quantizers.kv_int8 import fake_quantize_rows


class Int8RoundTrip(Cache):
    """A one-call cache: keys and values go to attention int8-rounded per token and head."""

    def __init__(self) -> None:
        super().__init__(layers=[])

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [batch, kv_heads, tokens, head_dim]: a row is one token of one head.
        return fake_quantize_rows(key_states), fake_quantize_rows(value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class Int8KVModel(nn.Module):
    """`model`, every forward attending over int8-rounded keys and values."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        out = self.model(input_ids=input_ids, cache=Int8RoundTrip(), use_cache=True)
        return SimpleNamespace(logits=out.logits)

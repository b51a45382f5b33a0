"""A scratch KV cache for tests that drive the runner directly."""

from __future__ import annotations

from quantizers.kv_int8 import row_bytes
from quantizers.loading import LoadedModel
from server.engine.kv_cache import KVCache
from server.engine.llama_runner import LlamaRunner


def scratch_cache(
    runner: LlamaRunner, sequences: int, tokens: int, block_size: int = 4
) -> tuple[KVCache, list[list[int]]]:
    """A cache with room for `sequences` of `tokens` tokens, and their block
    tables, interleaved (sequence i owns blocks i, i + n, i + 2n...) so that no
    sequence's blocks are contiguous."""
    per_sequence = -(-tokens // block_size)
    cache = KVCache(runner.kv_spec, sequences * per_sequence, block_size)
    tables = [list(range(i, sequences * per_sequence, sequences)) for i in range(sequences)]
    return cache, tables


def block_bytes(loaded: LoadedModel, block_size: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one KV block of `loaded`'s model stored as `kv_cache_dtype`."""
    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    row = row_bytes(head_dim, kv_cache_dtype, loaded.dtype)
    return 2 * config.num_hidden_layers * config.num_key_value_heads * row * block_size

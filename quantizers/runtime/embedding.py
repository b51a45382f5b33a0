"""Int8 embedding that shares its codes with a tied int8 lm_head.

SmolLM2 ties lm_head to the token embeddings: one [vocab, hidden] matrix, a
fifth of the model. Quantising lm_head alone would untie it and keep the float
embedding too (more bytes, not fewer). Per-row int8 codes serve both uses: a
row lookup for the embedding and `_weight_int8pack_mm` for the logits, so the
two modules hold the same buffers and the matrix is stored once. A constant
`multiplier` covers embeddings that scale their rows (Gemma's sqrt(hidden)).
"""

from __future__ import annotations

from typing import Any, Self

from torch import Tensor

from quantizers.runtime.base import COMPUTE_DTYPE, RuntimeModule, kernel_tensor


class Int8Embedding(RuntimeModule):
    """embedding[ids] = q[ids] * scale[ids] * multiplier, q int8 [V, D] and scale [V]."""

    def __init__(
        self, weight: Tensor, scale: Tensor, padding_idx: int | None = None,
        multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.multiplier = multiplier
        self.register_buffer("weight", kernel_tensor(weight))
        self.register_buffer("scale", kernel_tensor(scale))

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Self:
        return cls(
            tensors["weight"], tensors["scale"], meta.get("padding_idx"),
            float(meta.get("multiplier", 1.0)),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": 8,
            "padding_idx": self.padding_idx,
            "multiplier": self.multiplier,
        }

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.weight[ids].to(COMPUTE_DTYPE)
        rows = rows * self.scale[ids].to(COMPUTE_DTYPE).unsqueeze(-1)
        return rows if self.multiplier == 1.0 else rows * self.multiplier

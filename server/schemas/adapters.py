"""Bodies of the LoRA training API (`/admin/adapters`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantizers.lora.train import DEFAULT_TARGETS
from server.adapter_jobs import AdapterJob


class TrainAdapterRequest(BaseModel):
    """Train a LoRA adapter on the served variant and serve it as `name`.

    `dataset`: a bundled text (`tinyshakespeare`, `alice`) or a UTF-8 text file on
    the server; `train_fraction` trains on that leading share of its tokens (the
    rest can serve as held-out text)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^\S+$")
    dataset: str = Field(default="tinyshakespeare", min_length=1, max_length=4096)
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    steps: int = 100
    learning_rate: float = 1e-3
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    train_fraction: float = 1.0


class AdapterJobStatus(BaseModel):
    id: str
    name: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    step: int
    steps: int
    loss: float | None
    losses: list[float]  # the last 200 steps' losses
    key: str  # where the result is stored in the cache
    base: str
    cache_hit: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None

    @classmethod
    def of(cls, job: AdapterJob) -> AdapterJobStatus:
        spec = job.spec
        return cls(
            id=job.id,
            name=spec.name,
            state=job.state.value,
            step=job.step,
            steps=spec.config.steps,
            loss=job.loss,
            losses=list(job.losses),
            key=spec.key,
            base=spec.base,
            cache_hit=job.cache_hit,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=job.error,
        )


class AdapterJobList(BaseModel):
    data: list[AdapterJobStatus]

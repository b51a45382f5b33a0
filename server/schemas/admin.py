"""Pydantic models of the admin API (quantisation jobs, artifact cache, activation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quantizers.artifacts import ArtifactInfo
from quantizers.calibration import DATASET_FILES, MAX_SAMPLES, MAX_SEQ_LEN, CalibrationConfig
from server.quantization_jobs import Job

DatasetName = Literal[tuple(DATASET_FILES)]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationSpec(_Strict):
    """Calibration text for methods that need activations (GPTQ, AWQ, static W8A8…).
    Only the bundled datasets can be named over HTTP, never a server path."""

    dataset: DatasetName = "tinyshakespeare"
    samples: int = Field(default=64, ge=1, le=MAX_SAMPLES)
    seq_len: int = Field(default=256, ge=8, le=MAX_SEQ_LEN)

    def to_config(self) -> CalibrationConfig:
        return CalibrationConfig(dataset=self.dataset, samples=self.samples,
                                 seq_len=self.seq_len)


class QuantizeRequest(_Strict):
    method: str = Field(min_length=1, max_length=64, examples=["int4"])
    config: dict[str, Any] = Field(default_factory=dict, examples=[{"group_size": 128}])
    calibration: CalibrationSpec | None = None


class JobAccepted(BaseModel):
    """202: the job is queued; poll `status_url`."""

    job_id: str
    status_url: str
    state: str
    artifact_key: str


class ArtifactSummary(BaseModel):
    key: str
    method: str | None
    config: dict[str, Any] | None
    bytes: int
    created: float
    last_used: float
    quality: dict[str, Any] | None = None
    active: bool = False

    @classmethod
    def of(cls, info: ArtifactInfo, active_key: str | None) -> ArtifactSummary:
        return cls(**info.to_dict(), active=info.key == active_key)


class CacheHit(BaseModel):
    """200: the cache already held this variant; it is now being served."""

    status: Literal["cached"] = "cached"
    artifact: ArtifactSummary
    served: ServedVariant


class ServedVariant(BaseModel):
    model: str
    variant: str
    quantization: dict[str, Any] | None
    artifact: str | None
    weight_bytes: int


class JobProgress(BaseModel):
    layers_done: int
    layers_total: int
    percent: float
    phase: str
    # The method's own progress where it has one (qat: phase, step, steps,
    # loss, eta_s); null otherwise.
    detail: dict[str, Any] | None = None


class JobError(BaseModel):
    type: str
    message: str
    param: str | None = None
    layer: str | None = None
    disk_full: bool | None = None


class JobStatus(BaseModel):
    id: str
    origin: Literal["api", "startup"]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    method: str
    config: dict[str, Any]
    artifact_key: str
    cache_hit: bool
    progress: JobProgress
    timings: dict[str, float]
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: JobError | None
    quality: dict[str, Any] | None

    @classmethod
    def of(cls, job: Job) -> JobStatus:
        return cls(
            id=job.id, origin=job.origin, state=job.state.value, method=job.spec.method,
            config=job.spec.config, artifact_key=job.spec.key, cache_hit=job.cache_hit,
            progress=JobProgress(layers_done=job.layers_done, layers_total=job.layers_total,
                                 percent=job.percent, phase=job.phase, detail=job.detail),
            timings=dict(job.timings), created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, error=JobError(**job.error) if job.error else None,
            quality=job.quality,
        )


class JobList(BaseModel):
    data: list[JobStatus]


class CacheCounters(BaseModel):
    hits: int
    misses: int
    evictions: int
    corrupt: int


class ArtifactList(BaseModel):
    data: list[ArtifactSummary]
    total_bytes: int
    max_bytes: int | None
    counters: CacheCounters


class ActivateRequest(_Strict):
    """`artifact`: a key from GET /admin/artifacts, or "base" for the unquantised model."""

    artifact: str = Field(pattern=r"^([0-9a-f]{64}|base)$", examples=["base"])


class ArtifactDeleted(BaseModel):
    key: str
    deleted: Literal[True] = True


CacheHit.model_rebuild()

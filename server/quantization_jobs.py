"""Quantisation jobs: one at a time in a worker thread, the rest queued.

A job builds a variant from the base weights on disk (server.variant_pipeline)
while the engine keeps serving the current model; only the final
`engine.swap_model` touches what is served, under a lock, so a failed or
cancelled job leaves the served model exactly as it was. Activations of cached
artifacts and of the base model take the same lock, so two model changes never
interleave.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from quantizers import QuantizationCancelled, QuantizationError
from quantizers.artifacts import Artifact, ArtifactStore, ArtifactWriteError
from quantizers.calibration import CalibrationConfig
from quantizers.errors import LayerQuantizationError
from quantizers.loading import LoadedModel, load_model
from server.engine import Engine
from server.engine.device import (
    InsufficientDeviceMemory,
    ensure_free,
    logical_weights,
    quantization_job_bytes,
)
from server.memory import release_freed_memory
from server.metrics import record_quantization_job
from server.variant_pipeline import (
    QUALITY_TOKENS,
    BaseModelRef,
    BuildHooks,
    VariantSpec,
    ensure_variant,
    load_variant,
    resolve_spec,
)

log = logging.getLogger("quantserve.jobs")

KEEP_FINISHED_JOBS = 100


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class NotServing(RuntimeError):
    """No engine is running yet (the model is still loading)."""


class JobAlreadyFinished(RuntimeError):
    """A finished job cannot be cancelled."""


@dataclass
class Job:
    """One quantisation, as `GET /admin/jobs/{id}` reports it."""

    id: str
    spec: VariantSpec
    origin: str = "api"  # "api" or "startup"
    state: JobState = JobState.QUEUED
    phase: str = "queued"
    layers_done: int = 0
    layers_total: int = 0
    detail: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    artifact: str | None = None
    cache_hit: bool = False
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def percent(self) -> float:
        if self.state == JobState.SUCCEEDED:
            return 100.0
        return round(100.0 * self.layers_done / self.layers_total, 1) if self.layers_total else 0.0

    def progress(self, done: int, total: int, detail: dict[str, Any] | None = None) -> None:
        """Record `done` of `total` layers; never move backwards within a job.

        A method may report its slow stage (sensitivity measurement, GPTQ's
        solves) layer by layer and then count the final swaps from 1 again;
        a client polling the job should see it only go forward. `detail` is the
        method's own account of where it is (qat: step, loss, seconds left).
        """
        if detail is not None:
            self.detail = detail
        if total == self.layers_total and done < self.layers_done:
            return
        self.layers_done, self.layers_total = done, total

    def hooks(self) -> BuildHooks:
        return BuildHooks(on_phase=self._enter_phase, on_progress=self.progress,
                          should_cancel=self.cancel_requested.is_set, timings=self.timings)

    def _enter_phase(self, phase: str) -> None:
        self.phase = phase

    def start(self) -> None:
        self.state, self.started_at = JobState.RUNNING, time.time()
        self.timings["queued_s"] = round(self.started_at - self.created_at, 3)

    def finish(self, state: JobState, error: dict[str, Any] | None = None) -> None:
        self.finished_at = time.time()
        self.state, self.phase, self.error = state, state.value, error
        if self.started_at is not None:
            self.timings["total_s"] = round(self.finished_at - self.started_at, 3)
        record_quantization_job(self.spec.method, state.value,
                                self.finished_at - (self.started_at or self.created_at))


def describe_error(exc: BaseException) -> dict[str, Any]:
    """The `error` object of a failed job: what broke, and where when known."""
    if isinstance(exc, InsufficientDeviceMemory):
        return {"type": "insufficient_device_memory", "message": str(exc), "param": None,
                "layer": None}
    if isinstance(exc, ArtifactWriteError):
        return {"type": "artifact_write_error", "message": str(exc),
                "disk_full": exc.disk_full, "param": None, "layer": None}
    if isinstance(exc, QuantizationError):
        layer = exc.layer if isinstance(exc, LayerQuantizationError) else None
        return {"type": type(exc).__name__, "message": exc.message, "param": exc.param,
                "layer": layer}
    return {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}",
            "param": None, "layer": None}


class JobManager:
    """Owns the job queue, the worker thread and every change of served model."""

    def __init__(
        self,
        store: ArtifactStore,
        base: Callable[[], BaseModelRef],
        engine: Callable[[], Engine | None],
        *,
        serve_dtype: str = "bfloat16",
        quality_tokens: int = QUALITY_TOKENS,
    ) -> None:
        self.store = store
        self._base_factory = base
        self._engine = engine
        self.serve_dtype = serve_dtype
        self.quality_tokens = quality_tokens
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._current: Job | None = None

    @property
    def active_key(self) -> str | None:
        """The artifact being served (None for the base model or before serving):
        read from the engine, the one record of what is served."""
        engine = self._engine()
        return None if engine is None else engine.loaded.metadata.get("artifact")

    @cached_property
    def base(self) -> BaseModelRef:
        """Resolved on first use: hashing the base weights takes a moment."""
        return self._base_factory()

    def resolve(
        self, method: str, config: dict[str, Any] | None, calibration: CalibrationConfig | None
    ) -> VariantSpec:
        """Validate a request; raises ConfigError naming the field at fault."""
        return resolve_spec(self.base, method, config, calibration)

    def cached(self, spec: VariantSpec) -> Artifact | None:
        """The verified artifact for `spec`, if the cache holds it."""
        return self.store.get(spec.key)

    def submit(self, spec: VariantSpec) -> Job:
        """Queue a job, or return the queued/running one building the same key
        (unless that one is being cancelled)."""
        with self._lock:
            for job in self._jobs.values():
                if (job.spec.key == spec.key and not job.state.finished
                        and not job.cancel_requested.is_set()):
                    return job
            job = Job(id=f"qjob-{uuid.uuid4().hex[:16]}", spec=spec)
            self._remember(job)
            self._ensure_worker()
        self._queue.put(job.id)
        log.info("queued job %s: %s %s", job.id, spec.method, spec.config)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created_at, reverse=True)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, or ask a running one to stop at the
        next layer; raises JobAlreadyFinished for a finished job."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state.finished:
                raise JobAlreadyFinished(f"job {job_id} already {job.state.value}")
            job.cancel_requested.set()
            if job.state == JobState.QUEUED:
                job.finish(JobState.CANCELLED)
        log.info("cancel requested for job %s", job_id)
        return job

    def activate_artifact(self, artifact: Artifact) -> LoadedModel:
        """Serve a cached artifact (already verified by the store)."""
        engine = self._serving_engine()
        if self.active_key == artifact.key:
            return engine.loaded
        loaded = load_variant(artifact, self.base, engine.loaded.tokenizer)
        self._swap(engine, loaded)
        return loaded

    def activate_base(self) -> LoadedModel:
        """Go back to the unquantised model, reloaded from disk in the serving dtype."""
        engine = self._serving_engine()
        if engine.loaded.quantization is None:
            return engine.loaded
        loaded = load_model(self.base.source, dtype=self.serve_dtype, device=self.base.device,
                            model_id=self.base.model_id)
        self._swap(engine, loaded)
        return loaded

    def startup_variant(
        self, method: str, config: dict[str, Any] | None, calibration: CalibrationConfig | None
    ) -> LoadedModel:
        """The model to start serving with `--quantize`: the cached artifact when
        there is one (no quantisation), else a fresh build that is then cached.
        Recorded as a job (origin "startup") so the API shows which it was."""
        spec = self.resolve(method, config, calibration)
        job = Job(id=f"qjob-startup-{uuid.uuid4().hex[:8]}", spec=spec, origin="startup")
        with self._lock:
            self._remember(job)
        job.start()
        try:
            loaded, artifact, job.cache_hit = ensure_variant(
                spec, self.base, self.store, job.hooks(), quality_tokens=self.quality_tokens)
        except BaseException as exc:
            job.finish(JobState.FAILED, describe_error(exc))
            raise
        job.artifact, job.quality = artifact.key, artifact.manifest.get("quality")
        job.finish(JobState.SUCCEEDED)
        log.info("start-up variant %s (%s) %s in %.1fs", spec.method, spec.key[:12],
                 "loaded from the artifact cache" if job.cache_hit else "quantised and cached",
                 job.timings["total_s"])
        return loaded

    def protected_keys(self) -> frozenset[str]:
        """Artifacts eviction must keep: the one served and the one being built."""
        keys = {self.active_key} if self.active_key else set()
        if self._current is not None:
            keys.add(self._current.spec.key)
        return frozenset(keys)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel the running job and queued ones, and stop the worker."""
        with self._lock:
            for job in self._jobs.values():
                if not job.state.finished:
                    job.cancel_requested.set()
                    if job.state == JobState.QUEUED:
                        job.finish(JobState.CANCELLED)
            worker = self._worker
        self._queue.put(None)
        if worker is not None:
            worker.join(timeout_s)

    def _serving_engine(self) -> Engine:
        engine = self._engine()
        if engine is None:
            raise NotServing("the model is still loading")
        return engine

    def _swap(self, engine: Engine, loaded: LoadedModel) -> None:
        with self._swap_lock:
            engine.swap_model(loaded)
        log.info("now serving %s as %s", loaded.model_id, loaded.quantization or "float")

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        finished = [j for j in self._jobs.values() if j.state.finished]
        for old in sorted(finished, key=lambda j: j.created_at)[:-KEEP_FINISHED_JOBS]:
            del self._jobs[old.id]

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="quantserve-quantize",
                                            daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self._jobs.get(job_id)
            if job is None or job.state.finished:
                continue
            self._current = job
            # Each job computes on a thread that ends with it. libgomp keeps an
            # OpenMP pool per thread that ran torch ops in parallel, and once
            # more threads are pooled than there are cores it cuts every pool's
            # spin-wait: an idle pool left on this long-lived thread made the
            # engine's bf16 decode step ~1.5x slower for the server's lifetime.
            runner = threading.Thread(target=self._run, args=(job,),
                                      name="quantserve-quantize-job", daemon=True)
            try:
                runner.start()
                runner.join()
            finally:
                self._current = None
                # The build's temporaries (float model, copies) go back to the OS.
                release_freed_memory()

    def _run(self, job: Job) -> None:
        job.start()
        hooks = job.hooks()
        log.info("running job %s: %s", job.id, job.spec.method)
        try:
            engine = self._serving_engine()
            # Checked before any work: a job that cannot fit beside the served
            # model fails with the reason instead of taking the server down.
            needed = quantization_job_bytes(logical_weights(engine.loaded.model))
            ensure_free(self.base.device, needed, f"quantising with {job.spec.method}")
            loaded, artifact, job.cache_hit = ensure_variant(
                job.spec, self.base, self.store, hooks, protected=self.protected_keys(),
                quality_tokens=self.quality_tokens, tokenizer=engine.loaded.tokenizer)
            job.artifact, job.quality = artifact.key, artifact.manifest.get("quality")
            with hooks.timed("swap"):
                self._swap(engine, loaded)
        except QuantizationCancelled:
            job.finish(JobState.CANCELLED)
            log.info("job %s cancelled", job.id)
            return
        except (QuantizationError, ArtifactWriteError, NotServing,
                InsufficientDeviceMemory) as exc:
            job.finish(JobState.FAILED, describe_error(exc))
            log.warning("job %s failed: %s", job.id, exc)
            return
        except Exception as exc:
            job.finish(JobState.FAILED, describe_error(exc))
            log.exception("job %s failed unexpectedly", job.id)
            return
        job.finish(JobState.SUCCEEDED)
        log.info("job %s succeeded in %.1fs", job.id, job.timings["total_s"])

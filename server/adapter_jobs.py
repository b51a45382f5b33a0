"""LoRA training jobs: train an adapter on the served variant while it keeps serving.

A job trains on a private copy of the variant being served (reloaded from its
artifact, or the float base from disk), so serving never shares modules with
training; the engine only meets the result, loaded under the job's name. One
job trains at a time, each on a thread that ends with it (as quantisation jobs
do: an OpenMP pool left on a long-lived thread slows the engine). Progress is
the step and the loss; cancellation is checked every step.

Results are stored in PEFT format under `<cache dir>/adapters/<key>/`, the key
being the sha256 of the base artifact (or the base weights' hash), the training
text's sha256 and the canonical training config: the same request is a cache
hit that loads at once. A result is written to a temporary folder and renamed
into place, so a crash never leaves half an adapter.

Memory bound: a job's estimated peak (the model copy, the backward weights of
the quantised linears, activations of one step) must fit under
`QUANTSERVE_ADAPTER_TRAIN_MAX_BYTES`, checked at submission (422 naming
`batch_size`) so nothing starts that would push the server out of memory.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantizers.calibration import DATASET_FILES
from quantizers.datasets import data_file
from quantizers.errors import ConfigError
from quantizers.loading import LoadedModel, load_model
from quantizers.lora import LoraAdapter, read_adapter, write_adapter
from quantizers.lora.train import LoraTrainConfig, TrainingCancelled, target_paths, train_lora
from server.engine import Engine
from server.engine.device import logical_weights
from server.memory import release_freed_memory
from server.quantization_jobs import JobManager
from server.variant_pipeline import load_variant

log = logging.getLogger("quantserve.adapters")

FORMAT_VERSION = 1
KEEP_LOSSES = 200  # the last losses a job reports


class AdapterJobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TrainingSpec:
    """A validated request: what to train on which text, and the cache key it maps to."""

    name: str
    config: LoraTrainConfig
    dataset: str
    path: Path
    text_sha256: str
    train_fraction: float
    base: str  # the served artifact's key, or "float:<base weights hash>"
    key: str


@dataclass
class AdapterJob:
    id: str
    spec: TrainingSpec
    state: AdapterJobState = AdapterJobState.QUEUED
    step: int = 0
    loss: float | None = None
    losses: list[float] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    cache_hit: bool = False
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.state in (
            AdapterJobState.SUCCEEDED,
            AdapterJobState.FAILED,
            AdapterJobState.CANCELLED,
        )

    def on_step(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        self.losses = [*self.losses[-(KEEP_LOSSES - 1) :], round(loss, 5)]

    def finish(self, state: AdapterJobState, error: str | None = None) -> None:
        self.state, self.error, self.finished_at = state, error, time.time()


def dataset_path(dataset: str) -> Path:
    """A bundled text's file, or a text file on the server (a ConfigError if missing)."""
    relative = DATASET_FILES.get(dataset)
    path = data_file(relative) if relative else Path(dataset).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"dataset not found: {dataset!r} is neither a bundled text "
            f"({sorted(DATASET_FILES)}) nor a file on the server",
            "dataset",
        )
    return path


def training_bytes(model: nn.Module, config: LoraTrainConfig) -> int:
    """Rough peak bytes of a job: the model copy and the quantised linears'
    backward weights (4 bytes a weight, generously), plus one step's activations
    (40 hidden-sized float32 values per token and layer, 4 vocabulary-sized ones
    per token for the logits, their softmax and gradient)."""
    weights = logical_weights(model)
    config_ = model.config
    layers = int(getattr(config_, "num_hidden_layers", 1))
    hidden = int(getattr(config_, "hidden_size", 1))
    vocab = int(getattr(config_, "vocab_size", 1))
    tokens = config.batch_size * config.seq_len
    activations = tokens * (layers * hidden * 40 + vocab * 4) * 4
    return int(weights * 4 + activations)


def training_text_ids(path: Path, tokenizer: Any, fraction: float) -> torch.Tensor:
    """Token ids of the first `fraction` of the text's tokens."""
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: int(len(ids) * fraction)], dtype=torch.long)


class AdapterJobs:
    """The training jobs of one server, and its store of trained adapters."""

    def __init__(
        self,
        root: Path,
        jobs: JobManager,
        engine: Callable[[], Engine | None],
        *,
        serve_dtype: str,
        max_bytes: int,
    ) -> None:
        self.root = root
        self._jobs_manager = jobs
        self._engine = engine
        self.serve_dtype = serve_dtype
        self.max_bytes = max_bytes
        self._jobs: dict[str, AdapterJob] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._queue: list[AdapterJob] = []

    # ---------------------------------------------------------------- requests
    def resolve(
        self, name: str, dataset: str, train_fraction: float, config: LoraTrainConfig
    ) -> TrainingSpec:
        engine = self._serving()
        loaded = engine.loaded
        if name == loaded.model_id or name in {a.name for a in engine.adapters()}:
            raise ConfigError(f"the name {name!r} is already served; pick another", "name")
        target_paths(loaded.model, config.target_modules)  # a ConfigError naming none found
        if not 0 < train_fraction <= 1:
            raise ConfigError("train_fraction must be in (0, 1]", "train_fraction")
        needed = training_bytes(loaded.model, config)
        if needed > self.max_bytes:
            raise ConfigError(
                f"training would need about {needed / 2**30:.2f} GiB, over this server's "
                f"{self.max_bytes / 2**30:.2f} GiB bound (QUANTSERVE_ADAPTER_TRAIN_MAX_BYTES); "
                "lower batch_size or seq_len",
                "batch_size",
            )
        path = dataset_path(dataset)
        text_sha = hashlib.sha256(path.read_bytes()).hexdigest()
        artifact = loaded.metadata.get("artifact")
        base = artifact or f"float:{self._jobs_manager.base.source_hash}:{self.serve_dtype}"
        if loaded.quantization is not None and artifact is None:
            raise ConfigError(
                "the served variant is not in the artifact cache, so it cannot be "
                "reloaded to train on; quantise it through /admin/quantize",
                "name",
            )
        identity = {
            "format": FORMAT_VERSION,
            "base": base,
            "text_sha256": text_sha,
            "train_fraction": train_fraction,
            "config": config.to_dict(),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return TrainingSpec(name, config, dataset, path, text_sha, train_fraction, base, key)

    def cached(self, spec: TrainingSpec) -> Path | None:
        directory = self.root / spec.key
        return directory if (directory / "training.json").is_file() else None

    def load_cached(self, spec: TrainingSpec, directory: Path) -> None:
        """Serve a stored adapter under the request's name."""
        self._serving().load_adapter(spec.name, read_adapter(directory), str(directory))

    def submit(self, spec: TrainingSpec) -> AdapterJob:
        with self._lock:
            if any(j.spec.name == spec.name and not j.finished for j in self._jobs.values()):
                raise ConfigError(f"a job is already training {spec.name!r}", "name")
            job = AdapterJob(id=f"ajob-{uuid.uuid4().hex[:16]}", spec=spec)
            self._jobs[job.id] = job
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="quantserve-lora-train", daemon=True
                )
                self._thread.start()
        log.info("queued adapter job %s: %s on %s", job.id, spec.name, spec.dataset)
        return job

    def get(self, job_id: str) -> AdapterJob | None:
        return self._jobs.get(job_id)

    def list(self) -> list[AdapterJob]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> AdapterJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and not job.finished:
                job.cancel_requested.set()
                if job.state == AdapterJobState.QUEUED:
                    self._queue.remove(job)
                    job.finish(AdapterJobState.CANCELLED)
        return job

    def shutdown(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.cancel_requested.set()
            self._queue.clear()

    # ------------------------------------------------------------------ worker
    def _serving(self) -> Engine:
        engine = self._engine()
        if engine is None:
            raise RuntimeError("the model is still loading")
        return engine

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                job = self._queue.pop(0)
            runner = threading.Thread(
                target=self._run, args=(job,), name="quantserve-lora-job", daemon=True
            )
            runner.start()
            runner.join()
            release_freed_memory()

    def _model_copy(self, engine: Engine) -> LoadedModel:
        """The served variant, reloaded privately: training never touches served modules."""
        manager = self._jobs_manager
        key = engine.loaded.metadata.get("artifact")
        if key is not None:
            artifact = manager.store.get(key)
            if artifact is None:
                raise RuntimeError(f"the served artifact {key[:12]} left the cache")
            return load_variant(artifact, manager.base, engine.loaded.tokenizer)
        return load_model(
            manager.base.source,
            dtype=self.serve_dtype,
            device=manager.base.device,
            model_id=manager.base.model_id,
        )

    def _run(self, job: AdapterJob) -> None:
        spec = job.spec
        job.state, job.started_at = AdapterJobState.RUNNING, time.time()
        try:
            engine = self._serving()
            loaded = self._model_copy(engine)
            ids = training_text_ids(spec.path, loaded.tokenizer, spec.train_fraction)
            result = train_lora(
                loaded.model,
                ids,
                spec.config,
                on_step=job.on_step,
                should_cancel=job.cancel_requested.is_set,
            )
            del loaded
            directory = self._store(spec, result.adapter, result.losses, result.seconds)
            engine.load_adapter(spec.name, read_adapter(directory), str(directory))
        except TrainingCancelled:
            job.finish(AdapterJobState.CANCELLED)
            log.info("adapter job %s cancelled at step %d", job.id, job.step)
            return
        except Exception as exc:  # a failed job reports why; the server keeps serving
            job.finish(AdapterJobState.FAILED, f"{type(exc).__name__}: {exc}")
            log.warning("adapter job %s failed: %s", job.id, exc)
            return
        job.finish(AdapterJobState.SUCCEEDED)
        log.info(
            "adapter %s trained in %.1fs (loss %.3f), now served",
            spec.name,
            job.finished_at - job.started_at,
            job.loss or float("nan"),
        )

    def _store(
        self, spec: TrainingSpec, adapter: LoraAdapter, losses: list[float], seconds: float
    ) -> Path:
        final = self.root / spec.key
        staging = self.root / f".tmp-{spec.key}-{uuid.uuid4().hex[:8]}"
        write_adapter(adapter, staging, base_model=spec.base)
        record = {
            "key": spec.key,
            "base": spec.base,
            "dataset": spec.dataset,
            "text_sha256": spec.text_sha256,
            "train_fraction": spec.train_fraction,
            "config": spec.config.to_dict(),
            "seconds": round(seconds, 2),
            "final_loss": losses[-1] if losses else None,
        }
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():  # an earlier identical run finished first
            shutil.rmtree(staging)
        else:
            staging.rename(final)
        return final

"""Wiring of the artifact cache, the job manager and the admin API into the app.

The app factory calls `install_quantization` once; the start-up thread calls
`startup_model` when `--quantize` is set, instead of loading the float model.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from quantizers.artifacts import ArtifactStore
from quantizers.calibration import CalibrationConfig
from quantizers.loading import LoadedModel
from server.quantization_jobs import JobManager
from server.routes import admin
from server.settings import Settings
from server.variant_pipeline import BaseModelRef


def install_quantization(app: FastAPI, settings: Settings, device: str) -> JobManager:
    """Open the artifact store (cleaning dead writers' temp dirs, enforcing the
    size limit), create the job manager and mount /admin."""
    store = ArtifactStore(settings.cache_dir, settings.cache_max_bytes)
    jobs = JobManager(
        store,
        base=lambda: BaseModelRef.resolve(settings.model, settings.model_id, device),
        engine=lambda: app.state.engine,
        serve_dtype=settings.dtype,
    )
    app.state.artifact_store = store
    app.state.jobs = jobs
    app.include_router(admin.router)
    return jobs


def startup_model(jobs: JobManager, settings: Settings) -> LoadedModel:
    """The variant named by QUANTSERVE_QUANTIZE / --quantize: loaded from the
    cache when present, else quantised from the base weights and cached.

    QUANTSERVE_QUANTIZE_CONFIG is the method's config; a `calibration` object
    in it (dataset: a bundled name or a local text file, samples, seq_len)
    selects the calibration data.
    """
    if settings.quantize is None:
        raise ValueError("no start-up quantisation method is configured")
    config: dict[str, Any] = dict(settings.quantize_config)
    calibration = config.pop("calibration", None)
    request = CalibrationConfig.from_dict(calibration) if calibration is not None else None
    return jobs.startup_variant(settings.quantize, config, request)

"""`/admin/adapters`: train a LoRA adapter on the served variant, follow, cancel.

A request that matches a stored adapter (same base, text and config) loads it
at once (200, `cache_hit`); otherwise a job is queued (202) and the adapter is
served under its name when the job succeeds.
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from quantizers.errors import ConfigError
from quantizers.lora.train import LoraTrainConfig
from server.adapter_jobs import AdapterJob, AdapterJobs, AdapterJobState
from server.auth import require_admin
from server.engine.adapters import DuplicateAdapter
from server.engine.lora import AdapterMismatch
from server.errors import APIError, error_responses
from server.schemas.adapters import AdapterJobList, AdapterJobStatus, TrainAdapterRequest

_ERRORS = error_responses({
    400: "The body is not valid JSON, or the adapter cannot be served under that name",
    401: "No admin token sent",
    403: "Wrong admin token",
    404: "Unknown job, or the admin API is disabled (no admin token configured)",
    409: "A job is already training an adapter of that name",
    422: "Invalid request; `param` names the field",
    503: "The model is still loading",
})

router = APIRouter(
    prefix="/admin/adapters",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=_ERRORS,
)


def _jobs(request: Request) -> AdapterJobs:
    if request.app.state.engine is None:
        raise APIError(
            503, "the model is still loading", code="model_loading", headers={"Retry-After": "5"}
        )
    return request.app.state.adapter_jobs


@router.post(
    "",
    status_code=202,
    response_model=AdapterJobStatus,
    responses={
        200: {"model": AdapterJobStatus, "description": "A stored adapter matched; now served"}
    },
    summary="Train a LoRA adapter on the served variant; served as `name` when done",
)
def train_adapter(body: TrainAdapterRequest, request: Request) -> JSONResponse:
    jobs = _jobs(request)
    fields = {f.name for f in dataclasses.fields(LoraTrainConfig)}
    values = body.model_dump()
    try:
        config = LoraTrainConfig(
            **{k: v for k, v in values.items() if k in fields}
            | {"target_modules": tuple(body.target_modules)}
        )
        spec = jobs.resolve(body.name, body.dataset, body.train_fraction, config)
    except ConfigError as exc:
        raise APIError(422, exc.message, param=exc.param, code="invalid_config") from exc
    stored = jobs.cached(spec)
    if stored is not None:
        try:
            jobs.load_cached(spec, stored)
        except (AdapterMismatch, DuplicateAdapter) as exc:
            raise APIError(400, str(exc), param="name", code="adapter_exists") from exc
        job = AdapterJob(
            id="cached",
            spec=spec,
            cache_hit=True,
            state=AdapterJobState.SUCCEEDED,
            step=config.steps,
        )
        return JSONResponse(AdapterJobStatus.of(job).model_dump(), status_code=200)
    try:
        job = jobs.submit(spec)
    except ConfigError as exc:
        raise APIError(409, exc.message, param=exc.param, code="job_exists") from exc
    status = AdapterJobStatus.of(job).model_dump()
    return JSONResponse(
        status, status_code=202, headers={"Location": f"/admin/adapters/jobs/{job.id}"}
    )


@router.get("/jobs", response_model=AdapterJobList, summary="Training jobs, newest first")
def list_training_jobs(request: Request) -> AdapterJobList:
    return AdapterJobList(data=[AdapterJobStatus.of(j) for j in _jobs(request).list()])


@router.get(
    "/jobs/{job_id}", response_model=AdapterJobStatus, summary="A training job: step, loss, state"
)
def get_training_job(job_id: str, request: Request) -> AdapterJobStatus:
    job = _jobs(request).get(job_id)
    if job is None:
        raise APIError(404, f"no training job {job_id!r}", param="job_id", code="job_not_found")
    return AdapterJobStatus.of(job)


@router.delete(
    "/jobs/{job_id}",
    response_model=AdapterJobStatus,
    summary="Cancel a training job (a running one stops at its next step)",
)
def cancel_training_job(job_id: str, request: Request) -> AdapterJobStatus:
    job = _jobs(request).cancel(job_id)
    if job is None:
        raise APIError(404, f"no training job {job_id!r}", param="job_id", code="job_not_found")
    return AdapterJobStatus.of(job)

"""The admin API: quantise the live model, follow jobs, manage the artifact cache.

Every route needs `Authorization: Bearer <QUANTSERVE_ADMIN_TOKEN>` and the
whole API answers 404 when no admin token is configured (server.auth). Routes
that touch the disk or the model are plain `def`, so FastAPI runs them in its
thread pool and `/v1` traffic on the event loop never waits for them.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from quantizers import MethodUnavailableError, QuantizationError
from quantizers.loading import LoadedModel
from server.auth import require_admin
from server.errors import APIError, ErrorResponse, error_responses
from server.exporting import ExportFailed, export_download
from server.quantization_jobs import JobAlreadyFinished, JobManager, NotServing
from server.schemas.admin import (
    ActivateRequest,
    ArtifactDeleted,
    ArtifactList,
    ArtifactSummary,
    CacheCounters,
    CacheHit,
    JobAccepted,
    JobList,
    JobStatus,
    QuantizeRequest,
    ServedVariant,
)

_ERRORS = error_responses({
    400: "The body is not valid JSON (or not UTF-8)",
    401: "No admin token sent",
    403: "Wrong admin token",
    404: "Unknown id, or the admin API is disabled (no admin token configured)",
    422: "Invalid request; `param` names the field",
    503: "The model is still loading",
})

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=_ERRORS)


def _jobs(request: Request) -> JobManager:
    return request.app.state.jobs


def _served(loaded: LoadedModel) -> ServedVariant:
    return ServedVariant(model=loaded.model_id, variant=loaded.variant,
                         quantization=loaded.quantization,
                         artifact=loaded.metadata.get("artifact"),
                         weight_bytes=loaded.weight_bytes)


def _config_error(exc: QuantizationError) -> APIError:
    """422 naming the request field: `method`, `calibration.*` or `config.<field>`."""
    param = exc.param
    if param is None:
        param = "config"
    elif not param.startswith(("method", "calibration", "config")):
        param = f"config.{param}"
    code = "method_unavailable" if isinstance(exc, MethodUnavailableError) else "invalid_config"
    return APIError(422, exc.message, param=param, code=code)


def _not_serving(exc: NotServing) -> APIError:
    return APIError(503, str(exc), code="model_loading", headers={"Retry-After": "5"})


@router.post(
    "/quantize",
    status_code=202,
    response_model=JobAccepted,
    responses={200: {"model": CacheHit, "description": "Served from the artifact cache"}},
    summary="Quantise the base model with a method; the result is swapped in when done",
)
def start_quantization(body: QuantizeRequest, request: Request) -> JSONResponse:
    jobs = _jobs(request)
    if request.app.state.engine is None:
        raise _not_serving(NotServing("the model is still loading"))
    try:
        calibration = body.calibration.to_config() if body.calibration else None
        spec = jobs.resolve(body.method, body.config, calibration)
    except QuantizationError as exc:
        raise _config_error(exc) from exc
    artifact = jobs.cached(spec)
    info = jobs.store.info(spec.key) if artifact is not None else None
    if artifact is not None and info is not None:
        try:
            loaded = jobs.activate_artifact(artifact)
        except NotServing as exc:
            raise _not_serving(exc) from exc
        hit = CacheHit(artifact=ArtifactSummary.of(info, jobs.active_key), served=_served(loaded))
        return JSONResponse(hit.model_dump(mode="json"), status_code=200)
    job = jobs.submit(spec)
    status_url = str(request.url_for("get_job", job_id=job.id).path)
    accepted = JobAccepted(job_id=job.id, status_url=status_url, state=job.state.value,
                           artifact_key=spec.key)
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": status_url})


@router.get("/jobs", response_model=JobList, summary="All recent jobs, newest first")
def list_jobs(request: Request) -> JobList:
    return JobList(data=[JobStatus.of(job) for job in _jobs(request).list()])


@router.get("/jobs/{job_id}", response_model=JobStatus, summary="State, progress, timings, "
            "error and quality report of one job")
def get_job(job_id: str, request: Request) -> JobStatus:
    job = _jobs(request).get(job_id)
    if job is None:
        raise APIError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    return JobStatus.of(job)


@router.delete("/jobs/{job_id}", response_model=JobStatus,
               responses={409: {"model": ErrorResponse, "description": "Job already finished"}},
               summary="Cancel a queued or running job (the served model is kept)")
def cancel_job(job_id: str, request: Request) -> JobStatus:
    try:
        job = _jobs(request).cancel(job_id)
    except JobAlreadyFinished as exc:
        raise APIError(409, str(exc), param="job_id", code="job_finished") from exc
    if job is None:
        raise APIError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    return JobStatus.of(job)


@router.get("/artifacts", response_model=ArtifactList,
            summary="Cached artifacts, most recently used first, with cache counters")
def list_artifacts(request: Request) -> ArtifactList:
    jobs = _jobs(request)
    store = jobs.store
    return ArtifactList(
        data=[ArtifactSummary.of(info, jobs.active_key) for info in store.list()],
        total_bytes=store.total_bytes(), max_bytes=store.max_bytes,
        counters=CacheCounters(hits=store.hits, misses=store.misses,
                               evictions=store.evictions, corrupt=store.corrupt),
    )


@router.delete("/artifacts/{key}", response_model=ArtifactDeleted,
               responses={409: {"model": ErrorResponse,
                                "description": "The artifact is being served or built"}},
               summary="Delete a cached artifact")
def delete_artifact(key: str, request: Request) -> ArtifactDeleted:
    jobs = _jobs(request)
    if key in jobs.protected_keys():
        raise APIError(409, "this artifact is being served or built; activate another "
                            "variant first", param="key", code="artifact_in_use")
    if not jobs.store.delete(key):
        raise APIError(404, f"no artifact {key!r}", param="key", code="artifact_not_found")
    return ArtifactDeleted(key=key)


@router.post("/activate", response_model=ServedVariant,
             summary='Serve a cached artifact, or "base" for the unquantised model')
def activate(body: ActivateRequest, request: Request) -> ServedVariant:
    jobs = _jobs(request)
    try:
        if body.artifact == "base":
            return _served(jobs.activate_base())
        artifact = jobs.store.get(body.artifact)
        if artifact is None:
            raise APIError(404, "no such artifact in the cache (or it failed verification "
                                "and was quarantined)", param="artifact",
                           code="artifact_not_found")
        return _served(jobs.activate_artifact(artifact))
    except NotServing as exc:
        raise _not_serving(exc) from exc


@router.get(
    "/artifacts/{key}/export",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}},
                     "description": "The GGUF file, or the compressed-tensors directory "
                                    "as an uncompressed tar"}},
    summary="Download a cached artifact as GGUF (llama.cpp, Ollama) or compressed-tensors "
            "(vLLM)",
)
def export_artifact(
    key: str,
    request: Request,
    format: Literal["gguf", "compressed-tensors"] = Query(
        description="`gguf` or `compressed-tensors`"),
) -> FileResponse:
    artifact = _jobs(request).store.get(key)
    if artifact is None:
        raise APIError(404, f"no artifact {key!r}", param="key", code="artifact_not_found")
    try:
        return export_download(artifact, format)
    except ExportFailed as exc:
        raise APIError(422, str(exc), param="format", code="export_unsupported") from exc

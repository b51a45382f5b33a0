"""The FastAPI app factory and its lifespan.

The model loads in a background thread after the socket is open, so `/health`
answers at once and `/ready` turns 200 only when the model (and any start-up
quantisation) is ready — what Kubernetes probes and load balancers expect.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from quantizers.loading import LoadedModel, load_model
from server.adapter_jobs import AdapterJobs
from server.auth import require_admin, require_api_key
from server.engine import Engine
from server.engine.device import resolve_device
from server.engine.worker import CacheConfig
from server.errors import APIError, install_error_handlers
from server.limits import BodySizeLimit
from server.memory import release_freed_memory
from server.observability import install_observability
from server.quantization_service import install_quantization, startup_model
from server.routes import adapter_training, chat, completions, health, lora_adapters, models
from server.settings import Settings

log = logging.getLogger("quantserve")


def load_served_model(settings: Settings) -> LoadedModel:
    """The model the server starts with, in the serving dtype and device."""
    return load_model(settings.model, dtype=settings.dtype,
                      device=resolve_device(settings.device), model_id=settings.model_id,
                      quantized_gguf=settings.gguf_weights == "quantized")


def cache_config(settings: Settings) -> CacheConfig:
    return CacheConfig(
        kv_cache_bytes=settings.kv_cache_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        block_size=settings.block_size, prefix_caching=settings.enable_prefix_caching,
        kv_cache_dtype=settings.kv_cache_dtype,
    )


def _start_engine(app: FastAPI, settings: Settings) -> None:
    """Runs in a thread: load, warm up, then publish the engine (ready)."""
    started = time.perf_counter()
    try:
        loaded = (startup_model(app.state.jobs, settings) if settings.quantize
                  else load_served_model(settings))
        engine = Engine(loaded, max_num_seqs=settings.max_num_seqs,
                        max_model_len=settings.max_model_len,
                        max_num_batched_tokens=settings.max_num_batched_tokens,
                        max_queue=settings.max_queue, cache=cache_config(settings),
                        num_threads=settings.num_threads, compile=settings.compile,
                        runner=settings.runner, max_loras=settings.max_loras,
                        max_lora_rank=settings.max_lora_rank)
        warmup = engine.start()
        # A start-up quantisation's temporaries (the float model) go back to the OS.
        release_freed_memory()
    except Exception as exc:
        app.state.fatal_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("start-up failed: %s", app.state.fatal_error)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    app.state.engine = engine
    log.info("model %s (%s, %s) ready in %.1fs (warm-up %.1fs)", loaded.model_id,
             loaded.variant, str(loaded.dtype).removeprefix("torch."),
             time.perf_counter() - started, warmup)


async def require_engine(request: Request) -> None:
    """/v1 answers 503 until the model is loaded, and while draining."""
    if getattr(request.app.state, "engine", None) is None:
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "5"})
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=_start_engine, args=(app, settings),
                                  name="quantserve-loader", daemon=True)
        loader.start()
        yield
        app.state.draining = True
        app.state.jobs.shutdown()
        app.state.adapter_jobs.shutdown()
        engine: Engine | None = app.state.engine
        if engine is not None:
            engine.shutdown(drain_timeout_s=settings.drain_timeout_s)

    app = FastAPI(
        title="quantserve",
        version="0.1.0",
        summary="OpenAI-compatible serving of LLMs quantised on demand.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = None
    app.state.draining = False
    app.state.fatal_error = None
    app.state.started_at = int(time.time())

    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    # Added last, so outermost: 413s and CORS answers get a request id and a metric too.
    install_observability(app)
    app.include_router(health.router)
    jobs = install_quantization(app, settings, resolve_device(settings.device))
    app.state.adapter_jobs = AdapterJobs(
        settings.cache_dir / "adapters", jobs, lambda: app.state.engine,
        serve_dtype=settings.dtype, max_bytes=settings.adapter_train_max_bytes,
    )
    app.include_router(adapter_training.router)
    v1 = [Depends(require_api_key), Depends(require_engine)]
    for router in (completions.router, chat.router, models.router):
        app.include_router(router, prefix="/v1", dependencies=v1)
    app.include_router(lora_adapters.router, prefix="/v1",
                       dependencies=[Depends(require_admin), Depends(require_engine)])
    return app


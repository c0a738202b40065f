# syntax=docker/dockerfile:1
# The decode worker image: a CUDA runtime base, torch from the PyTorch CUDA wheel index, then
# the project's `worker` extra (transformers, bitsandbytes, accelerate). Non-root.
# Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t speckv-worker:0.1.0 .
# CPU variant with the tiny pair baked in (what the dev-cpu overlay runs):
#   docker build -f deploy/docker/worker.Dockerfile \
#     --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     --build-arg TINY_PAIR_SIZE=demo -t speckv-worker:dev-cpu .
# Torch comes from TORCH_INDEX_URL first, so the `torch>=` requirement of the extra is already
# met and pip does not pull another build from PyPI. Pin TORCH_SPEC (e.g. torch==2.13.0) to
# a version that the chosen index publishes for the chosen CUDA (cu128 = CUDA 12.8 wheels,
# which need a host driver that supports CUDA 12.8).
# Stages: `build` makes the worker's virtual environment; `tiny-pair` builds the pair with
# `speckv-tiny-pair` (the `tinypair` extra); the image (`worker`, last) gets only that venv and
# the pair's folder, so neither the builder's code nor the sources are in any of its layers.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS runtime-base
ENV DEBIAN_FRONTEND=noninteractive
# The base decides the distribution (Ubuntu for CUDA, Debian for the CPU variant), so apt
# versions cannot be pinned here; the base image tag pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY predictor_service/ predictor_service/
COPY decode_worker/ decode_worker/
COPY client/ client/
COPY benchmarks/speckv_eval/ benchmarks/speckv_eval/
# `pip install .` needs every package folder pyproject.toml names, the builder's too; it is
# removed from the installed environment right away (the RUN fails if it is still importable).
COPY benchmarks/speckv_tinypair/ benchmarks/speckv_tinypair/
RUN /opt/venv/bin/pip install ".[worker]" \
    && rm -rf /opt/venv/lib/python3*/site-packages/speckv_tinypair /opt/venv/bin/speckv-tiny-pair \
    && if /opt/venv/bin/python -c "import speckv_tinypair" 2>/dev/null; then \
         echo "the tiny-pair builder must not be in the worker image" >&2; exit 1; fi

# The tiny pair, built as root into the folder the image serves it from; deterministic for
# its seed, so the layer caches. An empty TINY_PAIR_SIZE leaves the folder empty.
FROM build AS tiny-pair
# test (about 2 min on 2 cores) or demo (about 10 min); empty = no tiny pair in the image.
ARG TINY_PAIR_SIZE=
RUN mkdir -p /opt/speckv/tiny-pair \
    && if [ -n "${TINY_PAIR_SIZE}" ]; then \
         /opt/venv/bin/pip install ".[tinypair]" \
         && /opt/venv/bin/speckv-tiny-pair --out /opt/speckv/tiny-pair \
              --size "${TINY_PAIR_SIZE}" --quiet; \
       fi

# Last stage = the default target.
FROM runtime-base AS worker
COPY --from=build /opt/venv /opt/venv
COPY --from=tiny-pair /opt/speckv/tiny-pair /opt/speckv/tiny-pair
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/triton
RUN groupadd --gid 10001 speckv \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin speckv
WORKDIR /tmp
USER 10001:10001
EXPOSE 50052 9464
# No HEALTHCHECK: Kubernetes probes grpc.health.v1 natively (deploy/base/worker-deployment.yaml).
ENTRYPOINT ["speckv-worker"]
CMD ["serve", "--help"]

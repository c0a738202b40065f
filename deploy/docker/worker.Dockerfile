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

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch
# test (about 2 min on 2 cores) or demo (about 10 min); empty = no tiny pair in the image.
ARG TINY_PAIR_SIZE=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The base decides the distribution (Ubuntu for CUDA, Debian for the CPU variant), so apt
# versions cannot be pinned here; the base image tag pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY predictor_service/ predictor_service/
COPY decode_worker/ decode_worker/
COPY client/ client/
COPY benchmarks/speckv_eval/ benchmarks/speckv_eval/
COPY benchmarks/speckv_tinypair/ benchmarks/speckv_tinypair/
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
    && /opt/venv/bin/pip install ".[worker]" \
    && rm -rf /src
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/triton
# Built as root into a read-only path; deterministic for its seed, so the layer caches.
RUN if [ -n "${TINY_PAIR_SIZE}" ]; then \
      speckv-tiny-pair --out /opt/speckv/tiny-pair --size "${TINY_PAIR_SIZE}"; \
    fi
RUN groupadd --gid 10001 speckv \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin speckv
WORKDIR /tmp
USER 10001:10001
EXPOSE 50052
# No HEALTHCHECK: Kubernetes probes grpc.health.v1 natively (deploy/base/worker-deployment.yaml).
ENTRYPOINT ["speckv-worker"]
CMD ["serve", "--help"]

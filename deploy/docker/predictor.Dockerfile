# syntax=docker/dockerfile:1
# The predictor image: CPU only, onnxruntime + gRPC, no torch (DESIGN.md), non-root.
# Build from the repository root:
#   docker build -f deploy/docker/predictor.Dockerfile --target predictor -t speckv-predictor:0.1.0 .
#   docker build -f deploy/docker/predictor.Dockerfile --target trainer   -t speckv-predictor-trainer:0.1.0 .
# `predictor` serves a model repository mounted at /models; `trainer` adds the `train` extra
# (scikit-learn, skl2onnx; still no torch) to register new versions into that repository.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=predictor
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the package needs: every package folder that pyproject.toml names must exist.
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY predictor_service/ predictor_service/
COPY decode_worker/ decode_worker/
COPY client/ client/
COPY benchmarks/speckv_eval/ benchmarks/speckv_eval/
COPY benchmarks/speckv_tinypair/ benchmarks/speckv_tinypair/
RUN /opt/venv/bin/pip install ".[${EXTRAS}]" \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then \
         echo "torch must not be in the predictor image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE} AS runtime-base
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --gid 10001 speckv \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin speckv \
    && mkdir -p /models \
    && chown 10001:10001 /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /tmp

FROM build AS build-trainer
RUN /opt/venv/bin/pip install ".[predictor,train]" \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then \
         echo "torch must not be in the trainer image" >&2; exit 1; fi

FROM runtime-base AS trainer
COPY --from=build-trainer /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["speckv-predictor"]
CMD ["train", "--help"]

# Last stage = the default target.
FROM runtime-base AS predictor
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
VOLUME ["/models"]
EXPOSE 50051 9090
# No HEALTHCHECK: Kubernetes probes grpc.health.v1 natively (deploy/base/predictor-deployment.yaml).
ENTRYPOINT ["speckv-predictor"]
CMD ["serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--poll-seconds", "10"]

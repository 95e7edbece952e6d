# syntax=docker/dockerfile:1.7
#
# bsbr-serve for a GPU host: CUDA runtime + cuDNN (onnxruntime-gpu's CUDA
# execution provider loads cuDNN from the system; torch brings its own CUDA
# libraries), Python 3.11, the project with the `gpu` and `redis` extras (the
# GPU profile keeps its sessions in Redis) and the shipped
# models. The same image runs standalone (`docker run --gpus all ...`) and as
# the Ray head/worker image of the KubeRay RayService in deploy/kuberay/,
# where KubeRay replaces the entry point with `ray start`.
#
#   docker build -t bsbr-serve:latest .
#   docker run --gpus all -p 8000:8000 -p 8080:8080 bsbr-serve:latest
#
# Runtime settings come from the environment (defaults below) or from a
# Serve config mounted over /app/deploy/serve_config.yaml (replicas, GPUs,
# accelerator type, autoscaling, session store).

ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------- build ----
FROM ${CUDA_IMAGE} AS build

ARG PYTHON_VERSION=3.11
# A standalone CPython under /opt/python (Ubuntu 22.04 has no maintained
# 3.11 package) and a virtual environment in /opt/venv: the runtime stage
# copies exactly these two directories.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    VIRTUAL_ENV=/opt/venv
COPY --from=ghcr.io/astral-sh/uv:0.5.11 /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv

WORKDIR /src
# Dependencies first, from pyproject alone, so that editing the code does not
# download torch and onnxruntime-gpu again. On Linux x86_64 PyPI's torch is
# the CUDA 12 build.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install -r pyproject.toml --extra gpu --extra redis
COPY bsbr_core/ bsbr_core/
COPY serve/ serve/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --no-deps ".[gpu,redis]"

# -------------------------------------------------------------- runtime ----
FROM ${CUDA_IMAGE} AS runtime

# wget: KubeRay's liveness/readiness probes exec `wget` inside Ray pods.
# Versions float with the base image's security updates on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv

# Non-root user. HOME must be writable: Ray keeps its auth token in ~/.ray.
RUN groupadd --system --gid 10001 bsbr \
    && useradd --system --uid 10001 --gid bsbr --create-home --home-dir /home/bsbr bsbr \
    && echo "export PATH=/opt/venv/bin:\$PATH" > /etc/profile.d/bsbr-venv.sh

WORKDIR /app
COPY models/ /app/models/
COPY deploy/serve_config.yaml deploy/serve_config.cpu.yaml /app/deploy/

# KubeRay starts Ray through `bash -lc`; /etc/profile.d keeps the venv first
# on PATH there too.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    HOME=/home/bsbr \
    BSBR_HOST=0.0.0.0 \
    BSBR_PORT=8000 \
    BSBR_METRICS_PORT=8080 \
    BSBR_CONFIG=/app/deploy/serve_config.yaml

USER 10001:10001

# 8000 HTTP API, 8080 Prometheus metrics (Ray's export), 8265 Ray dashboard.
EXPOSE 8000 8080 8265

# /healthz answers while the process lives; model loading on first start
# can take a while, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BSBR_PORT', '8000'), timeout=4)"]

# `bsbr-serve up` with the settings above; an empty BSBR_CONFIG serves every
# model under /app/models with the app's defaults. exec: the server is PID 1
# and gets SIGTERM from `docker stop` (it shuts Serve and Ray down cleanly).
# Arguments after the image name are appended (e.g. --num-cpus 16).
ENTRYPOINT ["/bin/sh", "-c", "exec bsbr-serve up --host \"$BSBR_HOST\" --port \"$BSBR_PORT\" --metrics-port \"$BSBR_METRICS_PORT\" ${BSBR_CONFIG:+--config \"$BSBR_CONFIG\"} \"$@\"", "bsbr-serve"]
CMD []

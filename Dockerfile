# syntax=docker/dockerfile:1
# lungnode: one image for every role. `serve` (the default) runs the embedded node;
# `scp`, `api`, `worker`, `beat` and `db upgrade` are the scaled roles (docs/deploy.md).
#
#   docker build -t lungnode .
#   docker build -t lungnode:cuda --build-arg TENSORFLOW_VARIANT=cuda .   # GPU workers
#
# Two stages: the builder has the compilers and builds the wheels (lungnode's own,
# and any dependency without a binary wheel for this platform) into a virtual
# environment; the final stage copies only that environment, the configuration and
# the model. The test-data generators (tests/, scripts/) never enter the image.

FROM python:3.11-slim-bookworm AS builder
# cpu: tensorflow-cpu, as pyproject.toml asks on x86_64. cuda (x86_64): TensorFlow with the
# CUDA libraries from PyPI (the host needs only the NVIDIA driver and container toolkit).
ARG TENSORFLOW_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lungnode ./lungnode
RUN pip wheel --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-index --find-links /wheels lungnode
RUN if [ "$TENSORFLOW_VARIANT" = "cuda" ]; then \
        version="$(/opt/venv/bin/pip show tensorflow-cpu | sed -n 's/^Version: //p')" \
        && test -n "$version" \
        && /opt/venv/bin/pip uninstall -y tensorflow-cpu \
        && /opt/venv/bin/pip install "tensorflow[and-cuda]==${version}"; \
    fi

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LUNGNODE_STORAGE_DIR=/var/lib/lungnode \
    LUNGNODE_DICOM_HOST=0.0.0.0 \
    LUNGNODE_HTTP_HOST=0.0.0.0
# libpq: psycopg 3 uses the system's when its binary wheel is not installed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric UID, so that a shared volume (NFS, a Kubernetes PVC) can be
# owned by it and Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 lungnode \
    && useradd --system --uid 10001 --gid lungnode --create-home --home-dir /opt/lungnode lungnode \
    && mkdir -p /var/lib/lungnode \
    && chown lungnode:lungnode /var/lib/lungnode
COPY --from=builder /opt/venv /opt/venv
# The working directory holds what the settings name relative to it:
# config/lungnode.toml and models/ (the bundled demo model).
WORKDIR /opt/lungnode
COPY config ./config
COPY models ./models

USER 10001:10001
VOLUME ["/var/lib/lungnode"]
# 11112: DICOM (serve, scp). 5000: the REST API (serve, api).
EXPOSE 11112 5000
# The API's health (database, disk, SCP, model). Roles without HTTP (scp, worker,
# beat) replace it with their own check; docker-compose.yml shows each.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('LUNGNODE_HTTP_PORT', '5000'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/api/v1/health', timeout=8).status != 200)"]
ENTRYPOINT ["lungnode"]
CMD ["serve"]

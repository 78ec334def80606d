#!/usr/bin/env bash
# Starts the MLflow tracking server in the foreground (exec: the server gets this pid).
#
# Same flags as pipeline/services.py::mlflow_server_command:
#   mlflow server --backend-store-uri ... --artifacts-destination ... \
#                 --host ... --port ... --workers ...
#
# Embedded default (one machine): SQLite backend and a local artifact folder under
#   ${FINSENT_STATE_DIR:-.finsent}/mlflow   (relative paths are taken from the current directory)
# on 127.0.0.1:${MLFLOW_PORT:-5000} with one worker.
#
# Scaled out: set any of
#   MLFLOW_BACKEND_STORE_URI      e.g. postgresql+psycopg2://mlflow:mlflow@postgres:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  e.g. s3://finsent-mlflow/artifacts (with MLFLOW_S3_ENDPOINT_URL,
#                                 AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY for an S3-compatible store)
#   MLFLOW_HOST                   default 127.0.0.1; 0.0.0.0 in a container
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                default 1
# Clients reach a non-local server by a host name: list it in MLFLOW_SERVER_ALLOWED_HOSTS.
# Extra arguments are passed on to `mlflow server`.
#
# The binary: <repo>/.venv/bin/mlflow when <repo>/.venv exists, else `mlflow` on PATH.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

if [[ -d "$repo/.venv" ]]; then
    mlflow_bin="$repo/.venv/bin/mlflow"
    if [[ ! -x "$mlflow_bin" ]]; then
        echo "server.sh: $repo/.venv exists but has no bin/mlflow; run 'make setup'" >&2
        exit 1
    fi
elif mlflow_bin="$(command -v mlflow)"; then
    :
else
    echo "server.sh: no $repo/.venv and no 'mlflow' on PATH" >&2
    exit 1
fi

backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
if [[ -z "$backend" || -z "$artifacts" ]]; then
    state="${FINSENT_STATE_DIR:-.finsent}"
    mkdir -p "$state/mlflow"
    root="$(cd "$state/mlflow" && pwd -P)"
    backend="${backend:-sqlite:///$root/mlflow.db}"
    artifacts="${artifacts:-$root/artifacts}"
fi

# Keeps the server near 0.4 GB: no background job runner.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

exec "$mlflow_bin" server \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" \
    --host "${MLFLOW_HOST:-127.0.0.1}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-1}" \
    "$@"

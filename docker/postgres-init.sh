#!/bin/bash
# Runs once, when the postgres volume is first initialised (mounted into
# /docker-entrypoint-initdb.d/ by compose.yaml). Three databases on one server:
# Airflow's metadata, the monitor's tables (written by the Airflow tasks) and MLflow's
# tracking/registry store. The role passwords come
# from the environment (docker/.env); psql quotes them (:'var'), so none is in a file.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v airflow_password="$AIRFLOW_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow WITH LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE DATABASE monitor OWNER airflow;
CREATE ROLE mlflow WITH LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL

-- Runs once, when the postgres volume is first initialised
-- (mounted into /docker-entrypoint-initdb.d/ by compose.yaml).
-- Two databases on one server: Airflow's metadata and MLflow's tracking/registry store.
-- The passwords are local-stack defaults and must match the URLs in compose.yaml;
-- change both for anything reachable by others.

CREATE ROLE airflow WITH LOGIN PASSWORD 'airflow';
CREATE DATABASE airflow OWNER airflow;

CREATE ROLE mlflow WITH LOGIN PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;

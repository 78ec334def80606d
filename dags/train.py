"""train: masked-LM adaptation → fine-tuning → evaluation → registration
(alias ``candidate``). Heavy steps run as ``finsent`` subprocesses."""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

CURATED_LABELED = Asset("finsent-curated-labeled")
CANDIDATE_MODEL = Asset("finsent-model-candidate")


@dag(dag_id="train", schedule=[CURATED_LABELED], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["finsent"])
def train_dag():
    @task
    def start_run() -> str:
        from pipeline.config import get_settings
        from pipeline.train.jobs import start_run as open_run

        return open_run(get_settings())["run_id"]

    @task
    def mlm_adapt(mlflow_run_id: str) -> str:
        from pipeline.steps import run_step

        return run_step("mlm-adapt", "--run-id", mlflow_run_id)["model_dir"]

    @task
    def finetune(mlflow_run_id: str, model_dir: str) -> str:
        from pipeline.steps import run_step

        return run_step("finetune", "--run-id", mlflow_run_id, "--model", model_dir)["model_dir"]

    @task
    def evaluate(mlflow_run_id: str, model_dir: str) -> dict:
        from pipeline.steps import run_step

        return run_step("evaluate", "--run-id", mlflow_run_id, "--model", model_dir)["metrics"]

    @task(outlets=[CANDIDATE_MODEL])
    def register(mlflow_run_id: str, model_dir: str, metrics: dict) -> str:
        from pipeline.steps import run_step

        return run_step("register", "--run-id", mlflow_run_id, "--model", model_dir)["model_uri"]

    mlflow_run_id = start_run()
    tuned = finetune(mlflow_run_id, mlm_adapt(mlflow_run_id))
    register(mlflow_run_id, tuned, evaluate(mlflow_run_id, tuned))


train_dag()

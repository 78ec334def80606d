"""train: masked-LM adaptation → fine-tuning (mapped over the sweep's trials)
→ best trial → evaluation → registration (alias ``candidate``). Heavy steps
run as ``finsent`` subprocesses in the GPU pool (and, under CeleryExecutor,
on the GPU queue)."""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

from pipeline.config import get_settings

CURATED_LABELED = Asset("finsent-curated-labeled")
CANDIDATE_MODEL = Asset("finsent-model-candidate")
_orchestration = get_settings().orchestration
# A retried step resumes from its last checkpoint (same run folder), so retries are cheap.
GPU = {"pool": _orchestration.gpu_pool, "queue": _orchestration.gpu_queue, "retries": 2}


@dag(dag_id="train", schedule=[CURATED_LABELED], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["finsent"])
def train_dag():
    @task
    def start_run() -> str:
        from pipeline.train.jobs import start_run as open_run

        return open_run(get_settings())["run_id"]

    @task(**GPU)
    def mlm_adapt(mlflow_run_id: str) -> str:
        from pipeline.steps import run_step

        return run_step("mlm-adapt", "--run-id", mlflow_run_id)["model_dir"]

    @task
    def sweep_trials() -> list[dict]:
        from pipeline.train.sweep import sweep_trials as trials

        return trials(get_settings().train)

    @task(**GPU)
    def finetune(mlflow_run_id: str, model_dir: str, trial: dict) -> dict:
        import json

        from pipeline.steps import run_step

        return run_step("finetune", "--run-id", mlflow_run_id, "--model", model_dir, "--trial", json.dumps(trial))

    @task
    def pick_best(mlflow_run_id: str, results: list[dict]) -> str:
        from pipeline.train.sweep import best_trial, log_sweep

        results = list(results)
        best = best_trial(results)
        if len(results) > 1:
            log_sweep(get_settings(), mlflow_run_id, results, best)
        return best["model_dir"]

    @task(**GPU)
    def evaluate(mlflow_run_id: str, model_dir: str) -> dict:
        from pipeline.steps import run_step

        return run_step("evaluate", "--run-id", mlflow_run_id, "--model", model_dir)["metrics"]

    @task(outlets=[CANDIDATE_MODEL])
    def register(mlflow_run_id: str, model_dir: str, metrics: dict) -> str:
        from pipeline.steps import run_step

        return run_step("register", "--run-id", mlflow_run_id, "--model", model_dir)["model_uri"]

    mlflow_run_id = start_run()
    tuned = finetune.partial(mlflow_run_id=mlflow_run_id, model_dir=mlm_adapt(mlflow_run_id)).expand(trial=sweep_trials())
    best = pick_best(mlflow_run_id, tuned)
    register(mlflow_run_id, best, evaluate(mlflow_run_id, best))


train_dag()

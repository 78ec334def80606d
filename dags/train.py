"""train (on new labeled data or on drift): masked-LM adaptation → fine-tuning (mapped over the sweep's trials)
→ best trial → evaluation → registration (alias ``candidate``). Heavy steps
run as ``finsent`` subprocesses in the GPU pool (and, under CeleryExecutor,
on the GPU queue). The run's ``recipe`` param names a training recipe
(``recipes/``), e.g. ``airflow dags test train --conf '{"recipe": "fpb-minilm"}'``;
without it FINSENT_RECIPE, or TrainConfig's defaults, apply. When data, code,
config and base match a run that registered a model, ``check_cache`` skips
every later task (no new candidate, so no release); ``{"no_cache": true}``
trains anyway."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from assets import CANDIDATE_MODEL, CURATED_LABELED, DRIFT

from pipeline.config import get_settings

_orchestration = get_settings().orchestration
# A retried step resumes from its last checkpoint (same run folder), so retries are cheap.
GPU = {"pool": _orchestration.gpu_pool, "queue": _orchestration.gpu_queue, "retries": 2,
       "execution_timeout": timedelta(minutes=_orchestration.step_timeout_minutes)}
RECIPE = Param(None, type=["null", "string"], description="a recipe name in recipes/ or a YAML file path")
NO_CACHE = Param(False, type="boolean", description="train even when a run with the same data, code, config and "
                 "base registered a model (by default that run is reused and nothing is trained)")


def _recipe(params: dict) -> list[str]:
    """The ``finsent`` arguments that pass the run's recipe on to a step."""
    return ["--recipe", params["recipe"]] if params.get("recipe") else []


# New labeled data, or the monitor's drift signal, starts a training run.
@dag(dag_id="train", schedule=(CURATED_LABELED | DRIFT), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     tags=["finsent"], params={"recipe": RECIPE, "no_cache": NO_CACHE})
def train_dag():
    @task
    def start_run(params=None) -> dict:
        from pipeline.config import settings_with_recipe
        from pipeline.train.jobs import start_run as open_run

        return open_run(settings_with_recipe(params["recipe"]), use_cache=not params["no_cache"])

    @task.short_circuit
    def check_cache(run: dict) -> str | bool:
        """The run id to train in; False, which skips every task after this one, when the run is a cached one."""
        return False if run["cached"] else run["run_id"]

    @task(**GPU)
    def mlm_adapt(mlflow_run_id: str, params=None) -> str:
        from pipeline.steps import run_step

        return run_step("mlm-adapt", "--run-id", mlflow_run_id, *_recipe(params))["model_dir"]

    @task
    def sweep_trials(params=None) -> list[dict]:
        from pipeline.config import settings_with_recipe
        from pipeline.train.sweep import sweep_trials as trials

        return trials(settings_with_recipe(params["recipe"]).train)

    @task(**GPU)
    def finetune(mlflow_run_id: str, model_dir: str, trial: dict, params=None) -> dict:
        import json

        from pipeline.steps import run_step

        return run_step("finetune", "--run-id", mlflow_run_id, "--model", model_dir, "--trial", json.dumps(trial),
                        *_recipe(params))

    @task
    def pick_best(mlflow_run_id: str, results: list[dict]) -> str:
        from pipeline.train.sweep import best_trial, log_sweep

        results = list(results)
        best = best_trial(results)
        if len(results) > 1:
            log_sweep(get_settings(), mlflow_run_id, results, best)
        return best["model_dir"]

    @task(**GPU)
    def evaluate(mlflow_run_id: str, model_dir: str, params=None) -> dict:
        from pipeline.steps import run_step

        return run_step("evaluate", "--run-id", mlflow_run_id, "--model", model_dir, *_recipe(params))["metrics"]

    @task(outlets=[CANDIDATE_MODEL])
    def register(mlflow_run_id: str, model_dir: str, metrics: dict, params=None) -> str:
        from pipeline.steps import run_step

        return run_step("register", "--run-id", mlflow_run_id, "--model", model_dir, *_recipe(params))["model_uri"]

    mlflow_run_id = check_cache(start_run())
    trials = sweep_trials()
    mlflow_run_id >> trials
    tuned = finetune.partial(mlflow_run_id=mlflow_run_id, model_dir=mlm_adapt(mlflow_run_id)).expand(trial=trials)
    best = pick_best(mlflow_run_id, tuned)
    register(mlflow_run_id, best, evaluate(mlflow_run_id, best))


train_dag()

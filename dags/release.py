"""release (on a new candidate): export and bless the ONNX variants, upload them
once → gate against the champion (frozen test split, paired bootstrap, slices,
behavioural suite) → serve the candidate on a loopback port (infra check) →
move ``champion`` by compare-and-set. One run at a time."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task
from assets import CANDIDATE_MODEL, CHAMPION_MODEL

from pipeline.config import get_settings


def _actor() -> str:
    context = get_current_context()
    return f"airflow:{context['dag'].dag_id}/{context['run_id']}"


@dag(dag_id="release", schedule=[CANDIDATE_MODEL], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     max_active_runs=1, tags=["finsent"])
def release_dag():
    @task(execution_timeout=timedelta(minutes=get_settings().orchestration.step_timeout_minutes))
    def export_onnx() -> dict:
        from pipeline.steps import run_step

        return run_step("export-onnx")

    @task
    def gate(exported: dict) -> dict:
        from pipeline.release.jobs import gate as decide

        return decide(get_settings(), exported["version"])

    @task
    def infra_check(decision: dict) -> dict | None:
        from pipeline.release.jobs import infra_check as check

        return check(get_settings(), decision["candidate_version"]) if decision["promote"] else None

    @task(outlets=[CHAMPION_MODEL])
    def promote(decision: dict, infra: dict | None) -> dict:
        from pipeline.release.jobs import promote as move_alias

        return move_alias(get_settings(), decision, infra, by=_actor())

    decision = gate(export_onnx())
    promote(decision, infra_check(decision))


release_dag()

"""release: export the candidate to ONNX with a parity check, gate it
against the champion on the test split, move ``champion`` if it passes."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task
from assets import CANDIDATE_MODEL, CHAMPION_MODEL


@dag(dag_id="release", schedule=[CANDIDATE_MODEL], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["finsent"])
def release_dag():
    @task
    def export_onnx() -> dict:
        from pipeline.steps import run_step

        return run_step("export-onnx")

    @task
    def gate(exported: dict) -> dict:
        from pipeline.config import get_settings
        from pipeline.release.jobs import gate as decide

        return decide(get_settings(), exported["version"])

    @task(outlets=[CHAMPION_MODEL])
    def promote(decision: dict) -> dict:
        from pipeline.config import get_settings
        from pipeline.release.jobs import promote as move_alias

        return move_alias(get_settings(), decision)

    promote(gate(export_onnx()))


release_dag()

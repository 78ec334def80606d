"""release_override (manual only): a person's forced promotion of a version past
the gate, or a rollback of ``champion`` to the version it replaced. Both are
recorded on the versions with the reason and the run that did it, e.g.
``airflow dags trigger release_override --conf '{"action": "rollback", "reason": "bad on earnings"}'``."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from assets import CHAMPION_MODEL


@dag(dag_id="release_override", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     max_active_runs=1, tags=["finsent"], params={
         "action": Param("rollback", enum=["promote", "rollback"], description="force-promote a version, or roll back"),
         "version": Param(None, type=["null", "string"], description="the version to promote (promote only)"),
         "reason": Param(type="string", minLength=3, description="why; recorded on the versions"),
     })
def release_override_dag():
    @task(outlets=[CHAMPION_MODEL])
    def override() -> dict:
        from pipeline.config import get_settings
        from pipeline.release.jobs import PromotionError, force_promote, rollback

        context = get_current_context()
        params, by = context["params"], f"airflow:release_override/{context['run_id']}"
        if params["action"] == "rollback":
            return rollback(get_settings(), params["reason"], by=by)
        if not params.get("version"):
            raise PromotionError("action 'promote' needs the param 'version'")
        return force_promote(get_settings(), params["version"], params["reason"], by=by)

    override()


release_override_dag()

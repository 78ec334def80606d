"""monitor (@daily, catching up from ``monitor.start_date``): score the day's
curated news with the champion (curating the landing files first where the
day has none), build the sentiment index and its alerts, check drift over the
trailing week. Drift past its data-derived thresholds emits the
``finsent-drift`` Asset event, with the statistics as extra; the train DAG is
scheduled on it. Backfill: ``airflow backfill create --dag-id monitor
--from-date D1 --to-date D2``; the index waits for the previous day's
(``depends_on_past``), scoring runs days in parallel."""

from __future__ import annotations

import logging
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException
from assets import DRIFT

from pipeline.config import get_settings

_monitor = get_settings().monitor
log = logging.getLogger(__name__)


def announce_alerts(context) -> None:
    """Task callback of build_index: one line per alert of the day. Put a
    Slack or e-mail notifier here; the webhook (FINSENT_ALERT_WEBHOOK) is sent by the task itself."""
    result = context["ti"].xcom_pull(task_ids="build_index") or {}
    for alert in result.get("alerts", []):
        log.warning("sentiment alert %s %s=%s: z-score %+.2f, net %+.3f, %d stories", alert["day"], alert["dimension"],
                    alert["key"], alert["zscore"], alert["net_mean"], alert["stories"])


@dag(
    dag_id="monitor",
    schedule="@daily",
    start_date=pendulum.datetime(_monitor.start_date.year, _monitor.start_date.month, _monitor.start_date.day, tz="UTC"),
    end_date=(pendulum.datetime(_monitor.end_date.year, _monitor.end_date.month, _monitor.end_date.day, tz="UTC")
              if _monitor.end_date else None),
    catchup=True,
    max_active_runs=4,
    tags=["finsent"],
)
def monitor_dag():
    # Scoring runs in the task's own process: Airflow's supervisor ends the task's process group on a timeout.
    @task(execution_timeout=timedelta(minutes=get_settings().orchestration.step_timeout_minutes))
    def score_news(data_interval_start=None) -> dict:
        from pipeline.monitor.days import has_work

        settings, day = get_settings(), data_interval_start.date()
        if not has_work(settings, day):  # checked before the scoring stack is imported: most days of a backfill
            raise AirflowSkipException(f"no news for {day}: no curated stories, no landing files")
        from pipeline.monitor.jobs import score_news as score

        result = score(settings, day)
        if result["status"] == "no news":  # the day's other tasks are skipped with it: a no-op costs one task
            raise AirflowSkipException(f"no news for {result['date']}: nothing to score, index or check")
        return result

    @task(depends_on_past=True, on_success_callback=announce_alerts)
    def build_index(scored: dict, data_interval_start=None) -> dict:
        from pipeline.monitor.jobs import build_index as index

        return index(get_settings(), data_interval_start.date())

    @task
    def detect_drift(indexed: dict, data_interval_start=None) -> dict:
        from pipeline.monitor.jobs import detect_drift as drift

        return drift(get_settings(), data_interval_start.date())

    @task(outlets=[DRIFT])
    def trigger_retraining(drift: dict, outlet_events=None) -> dict:
        if not drift["drifted"]:
            raise AirflowSkipException(f"no drift on {drift['date']} ({drift['status']}): nothing to trigger")
        outlet_events[DRIFT].extra = {"date": drift["date"], "fired": drift["fired"],
                                      "statistics": drift["statistics"], "thresholds": drift["thresholds"]}
        return {"date": drift["date"], "fired": drift["fired"]}

    trigger_retraining(detect_drift(build_index(score_news())))


monitor_dag()

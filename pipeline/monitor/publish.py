"""``finsent monitor-report``: the HTML report of a range of days, logged with
its figures and the daily overall figures (as metrics, one step per day) to
the MLflow experiment ``finsent-monitor``."""

from __future__ import annotations

import logging
from datetime import date, datetime, timezone
from pathlib import Path

import mlflow

from pipeline.config import Settings
from pipeline.monitor.jobs import store_for
from pipeline.monitor.report import report_figures, write_report

MONITOR_EXPERIMENT = "finsent-monitor"
DAILY_METRICS = ("stories", "net_mean", "decayed_net", "zscore", "positive_share", "negative_share")
log = logging.getLogger(__name__)


def _day_millis(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp() * 1000)


def publish_report(settings: Settings, first: date, last: date, out: Path | None = None) -> dict:
    store = store_for(settings)
    try:
        frames = {table: store.read(table, first, last) for table in ("index", "alerts", "drift", "shadow")}
    finally:
        store.close()
    title = f"finsent news sentiment {first.isoformat()} to {last.isoformat()}"
    out = out or settings.state_dir / "reports" / f"monitor-{first.isoformat()}-{last.isoformat()}.html"
    write_report(out, title=title, **frames)
    overall = frames["index"][frames["index"]["dimension"] == "overall"]
    drifted_days = sorted(set(frames["drift"].loc[frames["drift"]["drifted"].astype(bool), "day"]))
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(MONITOR_EXPERIMENT)
    with mlflow.start_run(run_name=f"monitor {first.isoformat()}..{last.isoformat()}") as run:
        mlflow.log_params({"from": first.isoformat(), "to": last.isoformat(),
                           "model_versions": ",".join(sorted(set(overall["model_version"].dropna().astype(str))))})
        for row in overall.itertuples():
            step = (date.fromisoformat(row.day) - first).days
            for name in DAILY_METRICS:
                value = getattr(row, name)
                if value is not None and value == value:  # NaN: low coverage or no baseline, not a zero
                    mlflow.log_metric(f"overall_{name}", float(value), step=step, timestamp=_day_millis(row.day))
        mlflow.log_metrics({"days_with_stories": len(overall), "alerts": len(frames["alerts"]),
                            "drifted_days": len(drifted_days)})
        mlflow.log_artifact(str(out), "report")
        for name, figure in report_figures(frames["index"], frames["alerts"], frames["drift"], frames["shadow"]).items():
            mlflow.log_figure(figure, f"report/{name}.png")
    log.info("report %s logged to MLflow run %s (experiment %s)", out, run.info.run_id, MONITOR_EXPERIMENT)
    return {"report": str(Path(out).resolve()), "days_with_stories": len(overall), "alerts": len(frames["alerts"]),
            "drifted_days": drifted_days, "mlflow_run_id": run.info.run_id, "experiment": MONITOR_EXPERIMENT}

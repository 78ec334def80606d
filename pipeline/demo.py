"""``make demo``: the whole pipeline once on the embedded default: an MLflow
server, an Airflow home, the three DAGs through ``airflow dags test``, then
the serving app on the champion, asked about three sentences over HTTP."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

from pipeline import registry, services
from pipeline.config import Settings
from pipeline.data.landing import layout_reuters
from pipeline.logs import Segments, StatusLine, adopt_library_loggers, log_file_for, parse_meter

# The training recipe the demo runs (recipes/demo.yaml) unless FINSENT_RECIPE says otherwise.
DEMO_RECIPE = "demo"
# `airflow dags test ingest <date>` ingests the news of the daily interval
# starting at <date>: Reuters-21578's busiest day.
DAG_RUNS = (("ingest", "1987-03-02"), ("train", None), ("release", None))
# The monitor's week: a quiet one of Reuters-21578 (375 stories on 6 days), so it fits the demo's minutes.
MONITOR_DAYS = (date(1987, 4, 23), date(1987, 4, 29))
# Drift windows of 100 texts (not 200) and a reference of 300 (not 1,000): the champion's reference is
# built in the demo's minutes. FINSENT_MONITOR__* variables set by the user win.
DEMO_MONITOR = {"FINSENT_MONITOR__DRIFT_WINDOW_TEXTS": "100", "FINSENT_MONITOR__DRIFT_REFERENCE_TEXTS": "300"}
SENTENCES = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 .",
    "The company said it would cut 400 jobs after sales fell sharply in the third quarter .",
    "The annual general meeting will be held in Helsinki on 15 April .",
]


log = logging.getLogger(__name__)


def _stage(message: str, started: float) -> None:
    print(f"[finsent demo {time.monotonic() - started:6.0f}s] {message}", flush=True)
    log.info("%s", message)  # demo.log: the terminal's lines among the libraries' (not shown twice: `demo` is quiet)


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def demo_env(tracking_uri: str, base: dict | None = None) -> dict[str, str]:
    """The environment the demo gives Airflow (and the serving app): the
    embedded tracking server, and the demo recipe unless one is chosen."""
    env = {**(os.environ if base is None else base), "FINSENT_TRACKING_URI": tracking_uri}
    env.setdefault("FINSENT_RECIPE", DEMO_RECIPE)
    for key, value in DEMO_MONITOR.items():
        env.setdefault(key, value)
    return env


def run_demo(settings: Settings, dags_folder: Path) -> dict:
    """The terminal gets one line per stage and per task (a progress bar while
    a task runs, its summary after), the predictions and a short hint; the
    full logs are in ``<state_dir>/logs`` (this process's in ``demo.log``)."""
    started = time.monotonic()
    adopt_library_loggers()  # MLflow, imported with pipeline.registry, logs to demo.log, not the terminal
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the hint says where the UI is
    state = settings.state_dir.resolve()
    logs = state / "logs"
    processes = []
    try:
        _stage(f"full logs in {logs}/ (this one: {log_file_for(state, 'demo').name}, Airflow's: airflow-dags-test-<dag>.log)",
               started)
        _stage("starting the MLflow tracking server (SQLite, local artifacts)", started)
        mlflow_process, tracking_uri = services.start_mlflow_server(state)
        processes.append(mlflow_process)
        env = services.airflow_env(state / "airflow", dags_folder, demo_env(tracking_uri))
        _stage(f"MLflow at {tracking_uri}; Airflow home {state / 'airflow'}; recipe {env['FINSENT_RECIPE']}", started)
        services.migrate_airflow_db(env, logs / "airflow-db.log")
        services.create_gpu_pool(env, logs / "airflow-cli.log", settings.orchestration)
        if settings.reuters_dir is not None:
            days = layout_reuters(settings.reuters_dir, settings.landing_zone)
            _stage(f"landing zone: {sum(days.values())} Reuters stories in {len(days)} day folders", started)
        for dag_id, logical_date in DAG_RUNS:
            log_path = logs / f"airflow-dags-test-{dag_id}.log"
            command = ["dags", "test", dag_id, *([logical_date] if logical_date else [])]
            _stage(f"airflow {' '.join(command)}", started)
            services.airflow(command, env, log_path, echo_task_output=True)
        settings = settings.model_copy(update={"tracking_uri": tracking_uri})
        champion = registry.version_by_alias(settings, registry.CHAMPION)
        candidate = registry.version_by_alias(settings, registry.CANDIDATE)
        if champion is None:
            raise RuntimeError("no champion after the release DAG: the first model did not clear the floor")
        client = registry.connect(settings)
        metrics = client.get_run(champion.run_id).data.metrics

        monitored = _monitor(settings, env, started, logs) if settings.reuters_dir is not None else None

        port = services.free_port()
        _stage(f"serving models:/{settings.model_name}@champion (version {champion.version}) on port {port}", started)
        server = services.start_serving(env, port, logs / "serving.log")
        processes.append(server)
        answer = post_json(f"http://127.0.0.1:{port}/v1/predict", {"texts": SENTENCES})
        for text, prediction in zip(SENTENCES, answer["predictions"]):
            scores = ", ".join(f"{k} {v:.3f}" for k, v in prediction["scores"].items())
            print(f"  {prediction['label']:>8}  ({scores})  {text}")
        summary = {
            "champion_version": champion.version,
            "candidate_version": candidate.version if candidate else None,
            "gate": candidate.tags.get("gate_reason") if candidate else None,
            "test_accuracy": metrics.get("test_accuracy"),
            "test_macro_f1": metrics.get("test_macro_f1"),
            "test_accuracy_allagree": metrics.get("test_accuracy_allagree"),
            "parity_max_abs_diff": champion.tags.get("parity_max_abs_diff"),
            "served_variant": champion.tags.get("onnx_default_cpu"),
            "blessing": {key.split("/", 1)[1]: value for key, value in champion.tags.items() if key.startswith("blessing/")},
            "monitor": monitored,
            "wall_s": round(time.monotonic() - started),
        }
        _stage(f"done: champion is version {champion.version}, test accuracy {_f(summary['test_accuracy'])}, "
               f"macro-F1 {_f(summary['test_macro_f1'])}", started)
        print(hint(state), flush=True)
        return summary
    finally:
        for process in reversed(processes):
            services.stop_process(process)


def _run_quietly(command: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Runs a ``finsent`` command with its output in ``log_path``: the terminal
    shows its progress bar on one line and nothing else. Returns its JSON result."""
    status, segments, last = StatusLine(), Segments(), ""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      env=env) as process:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            log.write(chunk)
            for text, _ in segments.feed(chunk):
                meter = parse_meter(text)
                if meter is not None and meter.startswith(command[3]):
                    status.show(f"  {meter}")
                elif text.strip():
                    last = text
    status.clear()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} exited with {process.returncode}: see {log_path}")
    return json.loads(last)


def _monitor(settings: Settings, env: dict[str, str], started: float, logs: Path) -> dict:
    """The champion scores a week of news: the index table, the alert days, the report."""
    from pipeline.monitor.publish import publish_report

    first, last = MONITOR_DAYS
    _stage(f"monitor: the news of {first}..{last} scored by the champion (index, alerts, drift)", started)
    finsent = [sys.executable, "-m", "pipeline.cli"]
    dates = ["--from", first.isoformat(), "--to", last.isoformat()]
    result = _run_quietly([*finsent, "monitor", *dates], env, logs / "demo-monitor.log")
    table = subprocess.run([*finsent, "index", *dates], env=env, capture_output=True, text=True, check=True).stdout
    print("\n".join(f"  {line}" for line in table.rstrip().splitlines()), flush=True)
    alert_days = sorted({alert["day"] for alert in result["alerts"]})
    print(f"  alerts: {len(result['alerts'])} on {', '.join(alert_days) or 'no day'}; "
          f"drifted days: {', '.join(result['drifted_days']) or 'none'}", flush=True)
    report = publish_report(settings, first, last)  # in this process: MLflow is already imported here
    _stage(f"monitor report: {report['report']} (logged to MLflow experiment {report['experiment']})", started)
    return {"days_with_news": result["days_with_news"], "stories": result["stories"], "reprints": result["reprints"],
            "alerts": len(result["alerts"]), "drifted_days": result["drifted_days"], "report": report["report"]}


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def hint(state: Path) -> str:
    """Where to look next (printed before the JSON result; at most 6 lines)."""
    home = state / "airflow"
    return f"""\
  MLflow UI:   .venv/bin/finsent mlflow-server --port 5000, then http://127.0.0.1:5000
  Airflow UI:  AIRFLOW_HOME={home} PATH=$PWD/.venv/bin:$PATH airflow standalone, then http://127.0.0.1:8080
               (login in {home}/simple_auth_manager_passwords.json.generated)
  Serving:     FINSENT_TRACKING_URI=http://127.0.0.1:5000 .venv/bin/finsent serve --port 8000 (MLflow server running)"""

"""``make demo``: the whole pipeline once on the embedded default: an MLflow
server, an Airflow home, the three DAGs through ``airflow dags test``, then
the serving app on the champion, asked about three sentences over HTTP."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

from pipeline import registry, services
from pipeline.config import Settings
from pipeline.data.landing import layout_reuters

# `airflow dags test ingest <date>` ingests the news of the daily interval
# starting at <date>: Reuters-21578's busiest day.
DAG_RUNS = (("ingest", "1987-03-02"), ("train", None), ("release", None))
SENTENCES = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 .",
    "The company said it would cut 400 jobs after sales fell sharply in the third quarter .",
    "The annual general meeting will be held in Helsinki on 15 April .",
]


def _stage(message: str, started: float) -> None:
    print(f"[finsent demo {time.monotonic() - started:6.0f}s] {message}", flush=True)


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def run_demo(settings: Settings, dags_folder: Path) -> dict:
    started = time.monotonic()
    state = settings.state_dir.resolve()
    logs = state / "logs"
    processes = []
    try:
        _stage("starting the MLflow tracking server (SQLite, local artifacts)", started)
        mlflow_process, tracking_uri = services.start_mlflow_server(state)
        processes.append(mlflow_process)
        env = services.airflow_env(state / "airflow", dags_folder, {**os.environ, "FINSENT_TRACKING_URI": tracking_uri})
        _stage(f"MLflow at {tracking_uri}; preparing the Airflow home {state / 'airflow'}", started)
        services.migrate_airflow_db(env, logs / "airflow-db.log")
        services.create_gpu_pool(env, logs / "airflow-cli.log", settings.orchestration)
        if settings.reuters_dir is not None:
            days = layout_reuters(settings.reuters_dir, settings.landing_zone)
            _stage(f"landing zone: {sum(days.values())} Reuters stories in {len(days)} day folders under {settings.landing_zone.resolve()}", started)
        for dag_id, logical_date in DAG_RUNS:
            log_path = logs / f"airflow-dags-test-{dag_id}.log"
            command = ["dags", "test", dag_id, *([logical_date] if logical_date else [])]
            _stage(f"airflow {' '.join(command)}  (Airflow's log: {log_path})", started)
            services.airflow(command, env, log_path, echo_task_output=True)
        settings = settings.model_copy(update={"tracking_uri": tracking_uri})
        champion = registry.version_by_alias(settings, registry.CHAMPION)
        candidate = registry.version_by_alias(settings, registry.CANDIDATE)
        if champion is None:
            raise RuntimeError("no champion after the release DAG: the first model did not clear the floor")
        client = registry.connect(settings)
        metrics = client.get_run(champion.run_id).data.metrics

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
            "wall_s": round(time.monotonic() - started),
        }
        _stage(f"done: champion is version {champion.version}", started)
        print(f"""
  champion: models:/{settings.model_name}@champion = version {champion.version}
  test accuracy {summary['test_accuracy']:.4f}, macro-F1 {summary['test_macro_f1']:.4f}, AllAgree accuracy {summary['test_accuracy_allagree']:.4f}
  gate on the latest candidate: {summary['gate']}

  MLflow UI:   .venv/bin/finsent mlflow-server --port 5000      then open http://127.0.0.1:5000
  Airflow UI:  AIRFLOW_HOME={state / 'airflow'} PATH=$PWD/.venv/bin:$PATH airflow standalone
               then open http://127.0.0.1:8080 (the login is in {state / 'airflow'}/simple_auth_manager_passwords.json.generated)
  Serving:     FINSENT_TRACKING_URI=http://127.0.0.1:5000 .venv/bin/finsent serve --port 8000
               (with the MLflow server above running)
""", flush=True)
        return summary
    finally:
        for process in reversed(processes):
            services.stop_process(process)

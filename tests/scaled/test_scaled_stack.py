"""The scaled profile against the machine's own PostgreSQL and Redis. ``finsent
stack up`` starts MLflow on PostgreSQL, and Airflow with the CeleryExecutor and
two workers. Then: the ingest → train → release chain runs on the workers,
training on the GPU-queue worker; a GPU worker SIGKILLed mid-task has its task
retried on a live worker, and nothing is lost or registered twice; a
three-day monitor backfill runs on the workers and equals day-by-day scoring;
``finsent stack down`` leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy
from mlflow import MlflowClient

from pipeline import services, stack
from pipeline.config import ScaledConfig, Settings
from pipeline.data.landing import layout_reuters
from pipeline.monitor.store import MonitorStore
from tests.conftest import REPO, TEST_INGEST_ENV, TINY_CHAIN_ENV

pytestmark = [pytest.mark.scaled, pytest.mark.e2e]
MONITOR_FIRST, MONITOR_LAST = date(1987, 3, 1), date(1987, 3, 3)
MONITOR_ENV = {"start_date": MONITOR_FIRST, "end_date": MONITOR_LAST, "min_stories": 3, "drift_window_days": 1,
               "drift_texts_per_day": 80, "drift_window_texts": 60, "drift_reference_texts": 150,
               "drift_calibration_windows": 40}
TRAINING_TASKS = ("mlm_adapt", "finetune", "evaluate")


@dataclass
class Stack:
    env: dict[str, str]  # the finsent settings every process of the stack runs with
    airflow: dict[str, str]  # that, plus what `airflow` commands need to reach the stack
    settings: Settings
    logs: Path

    def finsent(self, *args: str, env: dict[str, str] | None = None) -> dict:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env or self.env, capture_output=True,
                              text=True, cwd=self.settings.project_dir, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.strip().splitlines()  # the result is the last line (an ONNX export may print before it)
        return json.loads(lines[-1]) if lines else {}

    def cli(self, *args: str) -> None:
        services.airflow(list(args), self.airflow, self.logs / "airflow-cli.log")

    def task_instances(self, dag_id: str, run_id: str | None = None) -> pd.DataFrame:
        return _query(self.airflow, "SELECT t.run_id, t.task_id, t.map_index, t.state, t.queue, t.hostname, t.try_number, "
                      "t.start_date, t.end_date FROM task_instance t WHERE t.dag_id = :dag"
                      + (" AND t.run_id = :run" if run_id else ""), dag=dag_id, run=run_id)


def _query(env: dict[str, str], sql: str, **params) -> pd.DataFrame:
    engine = sqlalchemy.create_engine(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    try:
        with engine.connect() as connection:
            return pd.DataFrame(connection.execute(sqlalchemy.text(sql), params).mappings().all())
    finally:
        engine.dispose()


def _empty_redis_db(url: str) -> int:
    import redis

    for number in range(15, 0, -1):
        if redis.Redis.from_url(f"{url}/{number}").dbsize() == 0:
            return number
    pytest.skip("no empty Redis database to run the broker on")


def _stack_processes(airflow_home: str, worker: str | None = None) -> list[int]:
    """The stack's processes that are still running (of one worker only, with ``worker``)."""
    found = []
    for pid in stack._marked_processes(airflow_home):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if worker is None or f"FINSENT_WORKER_NAME={worker}".encode() in environ:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, fpb_subset, reuters_subset, headless_base):
    server = ScaledConfig()
    try:
        stack.require_services(server)
    except stack.StackError as error:  # `make test-scaled` starts them first; a bare pytest may not have them
        pytest.skip(str(error))
    suffix = uuid.uuid4().hex[:8]
    project = tmp_path_factory.mktemp("scaled-project")
    state = project / ".finsent"
    names = {"airflow_database": f"finsent_test_{suffix}_airflow", "mlflow_database": f"finsent_test_{suffix}_mlflow",
             "monitor_database": f"finsent_test_{suffix}_monitor"}
    broker = f"redis://127.0.0.1:6379/{_empty_redis_db('redis://127.0.0.1:6379')}"
    finsent = {
        "FINSENT_PROFILE": "scaled",
        **{f"FINSENT_SCALED__{key.upper()}": value for key, value in names.items()},
        "FINSENT_SCALED__BROKER_URL": broker,
        "FINSENT_PROJECT_DIR": str(project),
        "FINSENT_STATE_DIR": str(state),
        "FINSENT_FPB_DIR": str(fpb_subset),
        "FINSENT_REUTERS_DIR": str(reuters_subset),
        "FINSENT_TRACKING_URI": f"http://127.0.0.1:{services.free_port()}",
        "FINSENT_EXPERIMENT": "scaled",
        **TEST_INGEST_ENV,
        "FINSENT_TRAIN__BASE_MODEL": str(headless_base),
        **TINY_CHAIN_ENV,
        "FINSENT_TRAIN__EPOCHS": "3",  # a fine-tuning long enough to be killed in the middle
        **{f"FINSENT_MONITOR__{key.upper()}": str(value) for key, value in MONITOR_ENV.items()},
        # A worker that stops heartbeating is noticed in 20 s (default 300), its task retried 5 s later.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "5",
    }
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FINSENT_", "AIRFLOW"))}, **finsent}
    layout_reuters(reuters_subset, state / "landing")
    settings = Settings(profile="scaled", project_dir=project, state_dir=state, scaled=ScaledConfig(**names, broker_url=broker))
    handle = Stack(env, {}, settings, state / "logs")
    try:
        handle.finsent("stack", "up", "--dags", str(REPO / "dags"))
        handle.airflow = stack.stack_env(settings, REPO / "dags", env)
        yield handle
    finally:
        subprocess.run([sys.executable, "-m", "pipeline.cli", "stack", "down"], env=env, cwd=project, timeout=300)
        engine = sqlalchemy.create_engine(server.database_url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            for name in names.values():
                connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
        import redis

        redis.Redis.from_url(broker).flushdb()


def _wait_for_run(handle: Stack, dag_id: str, run_id: str | None, timeout: float) -> dict:
    runs = services.wait_for_runs(dag_id, handle.airflow, lambda run: run_id is None or run["run_id"] == run_id, 1, timeout)
    assert len(runs) == 1 and runs[0]["state"] == "success", (runs, f"logs: {handle.logs}")
    return runs[0]


def test_the_chain_runs_on_the_workers_and_training_on_the_gpu_worker(scaled):
    status = scaled.finsent("stack", "status")
    assert status["up"] and set(status["processes"]) == {
        "mlflow", "api-server", "scheduler", "dag-processor", "triggerer", "worker-default", "worker-gpu"}
    scaled.cli("dags", "reserialize")
    for dag_id in ("train", "release"):  # scheduled on assets: ingest's data, then train's candidate
        scaled.cli("dags", "unpause", dag_id)
    # The ingest run's tasks go to the workers too (--use-executor); its Asset event starts train, train's release.
    services.airflow(["dags", "test", "ingest", "1987-03-02", "--use-executor"], scaled.airflow,
                     scaled.logs / "dags-test-ingest.log")
    _wait_for_run(scaled, "train", None, timeout=900)
    _wait_for_run(scaled, "release", None, timeout=900)

    ingest = scaled.task_instances("ingest")
    assert set(ingest["state"]) == {"success"} and set(ingest["queue"]) == {"default"}
    assert all(host.startswith("default@") for host in ingest["hostname"])
    train = scaled.task_instances("train")
    assert set(train["state"]) == {"success"}, train
    training = train[train["task_id"].isin(TRAINING_TASKS)]
    assert sorted(set(training["task_id"])) == sorted(TRAINING_TASKS)
    assert set(training["queue"]) == {"gpu"} and all(host.startswith("gpu@") for host in training["hostname"])
    others = train[~train["task_id"].isin(TRAINING_TASKS)]
    assert set(others["queue"]) == {"default"} and all(host.startswith("default@") for host in others["hostname"])

    client = MlflowClient(scaled.env["FINSENT_TRACKING_URI"])
    champion = client.get_model_version_by_alias("finsent-sentiment", "champion")
    assert champion.version == "1" and champion.tags["gate_decision"] == "promote"
    # MLflow's backend store is the scaled profile's PostgreSQL database.
    engine = sqlalchemy.create_engine(scaled.settings.scaled.database_url(scaled.settings.scaled.mlflow_database))
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT count(*) FROM model_versions")).scalar() == 1
    engine.dispose()


def test_a_gpu_worker_killed_mid_task_has_its_task_retried_on_a_live_worker(scaled):
    client = MlflowClient(scaled.env["FINSENT_TRACKING_URI"])
    before = {v.version for v in client.search_model_versions("name = 'finsent-sentiment'")}
    run_id = "killed-worker"
    scaled.cli("dags", "trigger", "train", "--run-id", run_id, "--conf", json.dumps({"no_cache": True}))
    deadline = time.monotonic() + 600
    while True:
        tis = scaled.task_instances("train", run_id)
        running = tis[(tis["task_id"] == "finetune") & (tis["state"] == "running")] if len(tis) else tis
        if len(running):
            break
        assert time.monotonic() < deadline, tis
        time.sleep(0.5)
    gpu = scaled.finsent("stack", "status")["processes"]["worker-gpu"]
    os.killpg(gpu["pid"], signal.SIGKILL)  # the node is gone: worker, its pool, the task and its supervisor
    scaled.finsent("stack", "add-worker", "--name", "gpu-2", "--queue", "gpu", "--dags", str(REPO / "dags"))
    _wait_for_run(scaled, "train", run_id, timeout=900)

    finetune = scaled.task_instances("train", run_id).set_index("task_id").loc["finetune"]
    assert finetune["state"] == "success" and finetune["try_number"] == 2 and finetune["hostname"].startswith("gpu-2@")
    first_try = _query(scaled.airflow, "SELECT hostname, state FROM task_instance_history WHERE dag_id = 'train' "
                       "AND run_id = :run AND task_id = 'finetune'", run=run_id)
    assert len(first_try) == 1 and first_try["hostname"][0].startswith("gpu@") and first_try["state"][0] == "failed"
    # No process of the dead worker is left: its step ended with the task that started it.
    assert _stack_processes(scaled.airflow["AIRFLOW_HOME"], worker="gpu") == []
    # Exactly one new version, from this run's MLflow run, with the evaluation logged once per metric.
    after = {v.version: v for v in client.search_model_versions("name = 'finsent-sentiment'")}
    new = [after[number] for number in set(after) - before]
    assert len(new) == 1
    mlflow_run = client.get_run(new[0].run_id)
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "test_macro_f1")] == [0]
    trained = Path(scaled.env["FINSENT_STATE_DIR"]) / "runs" / mlflow_run.info.run_id / "finetune"
    assert [p.name for p in trained.iterdir() if p.is_dir()] == ["trial-0"]
    assert (trained / "trial-0" / "model" / "config.json").is_file()


def test_a_three_day_monitor_backfill_on_the_workers_equals_day_by_day(scaled, tmp_path):
    # Created while the DAG is paused: the backfill's runs hold the three days before the scheduler's catch-up
    # would make its own for them.
    scaled.cli("backfill", "create", "--dag-id", "monitor", "--from-date", MONITOR_FIRST.isoformat(),
               "--to-date", MONITOR_LAST.isoformat(), "--max-active-runs", "3", "--reprocess-behavior", "failed")
    scaled.cli("dags", "unpause", "monitor")
    runs = services.wait_for_runs("monitor", scaled.airflow, lambda run: run["run_id"].startswith("backfill__"), 3, 900)
    assert len(runs) == 3 and all(run["state"] == "success" for run in runs), runs
    tis = scaled.task_instances("monitor")
    scored = tis[tis["task_id"] == "score_news"].sort_values("start_date")
    assert all(host.startswith("default@") for host in scored["hostname"])
    # The days ran side by side: a day's scoring started before another's had ended.
    assert any(later < earlier_end for later, earlier_end in zip(scored["start_date"][1:], scored["end_date"][:-1]))

    # The same days one after another, in one process, on the embedded profile's files.
    daily = tmp_path / "daily"
    env = {**scaled.env, "FINSENT_PROFILE": "embedded", "FINSENT_PROJECT_DIR": str(daily),
           "FINSENT_STATE_DIR": str(daily / ".finsent")}
    layout_reuters(Path(scaled.env["FINSENT_REUTERS_DIR"]), daily / ".finsent" / "landing")
    for folder in ("labeled", "corpus"):  # the drift reference's texts; the news is curated from the landing files
        shutil.copytree(scaled.settings.data_dir / "curated" / folder, daily / "data" / "curated" / folder)
    scaled.finsent("monitor", "--from", MONITOR_FIRST.isoformat(), "--to", MONITOR_LAST.isoformat(), env=env)

    backfilled = MonitorStore(scaled.settings.monitor_database_url)
    one_by_one = MonitorStore(f"sqlite:///{daily / '.finsent' / 'monitor.db'}")
    try:
        for table in ("index", "alerts"):
            keys = ["day", "dimension", "key"]
            ours, theirs = (store.read(table, MONITOR_FIRST, MONITOR_LAST).sort_values(keys).reset_index(drop=True)
                            for store in (backfilled, one_by_one))
            if table == "index":
                assert set(ours["day"]) == {"1987-03-01", "1987-03-02", "1987-03-03"}
            pd.testing.assert_frame_equal(ours, theirs, check_dtype=False)
    finally:
        backfilled.close()
        one_by_one.close()


def test_stack_down_leaves_nothing_running(scaled):
    status = scaled.finsent("stack", "status")
    running = {name for name, entry in status["processes"].items() if entry["running"]}
    assert running == set(status["processes"]) - {"worker-gpu"}, status  # that one was killed above
    assert not status["up"]
    home = status["airflow_home"]
    assert len(_stack_processes(home)) >= len(running)
    stopped = scaled.finsent("stack", "down")
    assert stopped["stopped"] == list(status["processes"]) and stopped["leftovers"] == []
    assert _stack_processes(home) == []
    assert not stack.stack_file(scaled.settings).exists()
    assert all(stack._start_time(entry["pid"]) != entry["start_time"] for entry in status["processes"].values())

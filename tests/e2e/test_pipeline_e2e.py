"""ingest → train → release through ``airflow dags test`` against a real
MLflow server, then a real HTTP prediction from the serving app."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import date
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline import services
from pipeline.config import OrchestrationConfig
from pipeline.data.landing import day_folder, layout_reuters
from pipeline.data.sources import read_phrasebank
from pipeline.monitor.store import MonitorStore
from tests.conftest import FPB_DIR, REPO, TEST_INGEST_ENV, TINY_CHAIN_ENV

pytestmark = pytest.mark.e2e


MONITOR_FIRST, MONITOR_LAST = date(1987, 3, 1), date(1987, 3, 3)
DRIFT_DAY = date(1987, 3, 4)  # a day fed with Financial PhraseBank negatives instead of news
MONITOR_ENV = {"start_date": MONITOR_FIRST, "end_date": DRIFT_DAY, "min_stories": 3, "drift_window_days": 1,
               "drift_texts_per_day": 80, "drift_window_texts": 60, "drift_reference_texts": 150,
               "drift_calibration_windows": 40}


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory, mlflow_server, fpb_subset, reuters_subset, headless_base):
    project = tmp_path_factory.mktemp("e2e-project")
    finsent = {
        "FINSENT_PROJECT_DIR": str(project),
        "FINSENT_STATE_DIR": str(project / ".finsent"),
        "FINSENT_FPB_DIR": str(fpb_subset),
        "FINSENT_REUTERS_DIR": str(reuters_subset),
        "FINSENT_TRACKING_URI": mlflow_server,
        "FINSENT_EXPERIMENT": "e2e",
        **TEST_INGEST_ENV,
        # Without a masked-LM head, as the default MiniLM ships: its head is fitted before the gate.
        "FINSENT_TRAIN__BASE_MODEL": str(headless_base),
        **TINY_CHAIN_ENV,
        "FINSENT_TRAIN__EPOCHS": "2",
        # The monitor: days of the Reuters subset, small drift windows, one day per window.
        **{f"FINSENT_MONITOR__{key.upper()}": str(value) for key, value in MONITOR_ENV.items()},
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FINSENT_", "AIRFLOW"))}
    env = services.airflow_env(project / ".finsent" / "airflow", REPO / "dags", {**base, **finsent})
    services.migrate_airflow_db(env, project / "airflow-db.log")
    services.create_gpu_pool(env, project / "airflow-cli.log", OrchestrationConfig())
    return env


def _dags_test(dag_id: str, env: dict) -> None:
    services.airflow(["dags", "test", dag_id], env, Path(env["FINSENT_STATE_DIR"]) / f"dags-test-{dag_id}.log")


def test_chain_registers_promotes_and_serves(pipeline_env):
    env = pipeline_env
    for dag_id in ("ingest", "train", "release"):
        _dags_test(dag_id, env)

    client = MlflowClient(env["FINSENT_TRACKING_URI"])
    champion = client.get_model_version_by_alias("finsent-sentiment", "champion")
    candidate = client.get_model_version_by_alias("finsent-sentiment", "candidate")
    assert champion.version == candidate.version == "1"
    assert float(champion.tags["parity_max_abs_diff"]) < 1e-4
    assert int(champion.tags["parity_label_flips"]) == 0
    assert champion.tags["gate_decision"] == "promote" and champion.tags["infra_check"] == "pass"
    assert "fp32" in champion.tags["onnx_variants"].split(",") and champion.tags["onnx_artifact"] == "onnx/v1"
    assert champion.tags["data_digest"].endswith(".dir")
    # The training checkpoints served only retries: registration removed them, the models stay.
    runs = Path(env["FINSENT_STATE_DIR"]) / "runs"
    assert not list(runs.rglob("checkpoints")) and list(runs.glob("*/finetune/trial-0/model/config.json"))
    run = client.get_run(champion.run_id)
    for metric in ("test_accuracy", "test_macro_f1", "test_roc_auc_ovr", "test_accuracy_allagree", "test_ece",
                   "test_macro_f1_allagree", "mlm_perplexity_base", "mlm_perplexity_random_head"):
        assert metric in run.data.metrics, metric
    assert run.data.params["mlm_head_fit_steps"] == "4"
    assert "head fitted 4 steps" in run.data.tags["mlm_decision"]
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/training_curves.png", "plots/reliability_diagram.png"} <= artifacts
    assert {"git_commit", "config_hash", "test_digest"} <= set(champion.tags)
    card = client.download_artifacts(champion.run_id, "model_card.md")
    assert "CC BY-NC-SA 3.0" in Path(card).read_text()
    assert client.list_artifacts(champion.run_id, "data_docs"), "Great Expectations Data Docs not logged"

    # The registered model is usable on its own through MLflow's pyfunc interface.
    mlflow.set_tracking_uri(env["FINSENT_TRACKING_URI"])
    pyfunc = mlflow.pyfunc.load_model("models:/finsent-sentiment@candidate")
    scored = pyfunc.predict(pd.DataFrame({"text": ["Operating profit rose .", "Sales fell ."]}))
    assert list(scored.columns) == ["label", "negative", "neutral", "positive"]
    assert len(scored) == 2 and set(scored["label"]) <= {"negative", "neutral", "positive"}

    port = services.free_port()
    server = services.start_serving(env, port, Path(env["FINSENT_STATE_DIR"]) / "serving.log")
    try:
        status, body = _post(f"http://127.0.0.1:{port}/v1/predict", {"texts": ["Operating profit rose .", "Sales fell ."]})
        assert status == 200, body
        assert body["model_version"] == champion.version and body["model_name"] == "finsent-sentiment"
        assert [set(p["scores"]) for p in body["predictions"]] == [{"negative", "neutral", "positive"}] * 2
        status, body = _post(f"http://127.0.0.1:{port}/v1/predict", {"texts": ["ok", ""]})
        assert status == 422 and "texts[1] is empty" in json.dumps(body)
    finally:
        services.stop_process(server)
    assert server.poll() is not None


def _airflow_db(env: dict) -> Path:
    return Path(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///").split("?")[0])


def _candidate_events(env: dict) -> int:
    with sqlite3.connect(_airflow_db(env)) as connection:
        return connection.execute("SELECT count(*) FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                                  "WHERE a.name = 'finsent-model-candidate'").fetchone()[0]


def test_an_unchanged_rerun_of_train_reuses_the_run_and_trains_nothing(pipeline_env):
    # Same data, code, config and base as the chain's run: start_run finds that run in MLflow, and
    # check_cache skips every later task, so nothing is trained, registered or handed to the release.
    env = pipeline_env
    client = MlflowClient(env["FINSENT_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name(env["FINSENT_EXPERIMENT"]).experiment_id
    runs = {run.info.run_id for run in client.search_runs([experiment_id])}
    versions = {v.version for v in client.search_model_versions("name = 'finsent-sentiment'")}
    events = _candidate_events(env)
    _dags_test("train", env)

    with sqlite3.connect(_airflow_db(env)) as connection:
        (run_id,) = connection.execute("SELECT run_id FROM dag_run WHERE dag_id = 'train' ORDER BY id DESC LIMIT 1").fetchone()
        states = dict(connection.execute("SELECT task_id, state FROM task_instance WHERE dag_id = 'train' AND run_id = ?",
                                         (run_id,)).fetchall())
    training = ["mlm_adapt", "sweep_trials", "finetune", "pick_best", "evaluate", "register"]
    assert states == {"start_run": "success", "check_cache": "success", **dict.fromkeys(training, "skipped")}
    assert {run.info.run_id for run in client.search_runs([experiment_id])} == runs
    assert {v.version for v in client.search_model_versions("name = 'finsent-sentiment'")} == versions
    assert _candidate_events(env) == events
    reused = client.get_run(client.get_model_version("finsent-sentiment", "1").run_id).data.tags
    assert reused["cache_key"] and reused["cache_hits"] == "1" and reused["cache_reused_at"]


def _monitor_rows(env: dict) -> pd.DataFrame:
    store = MonitorStore(f"sqlite:///{Path(env['FINSENT_STATE_DIR']).resolve() / 'monitor.db'}")
    try:
        return store.read("index", MONITOR_FIRST, DRIFT_DAY)
    finally:
        store.close()


def test_monitor_dag_scores_a_day_emits_drift_and_a_backfill_replaces_rows(pipeline_env, reuters_subset):
    env = dict(pipeline_env)
    state = Path(env["FINSENT_STATE_DIR"])
    logs = state / "logs"
    layout_reuters(reuters_subset, state / "landing")
    # Every DAG in the metadata DB, so an asset event finds the DAGs scheduled on it.
    services.airflow(["dags", "reserialize"], env, logs / "airflow-cli.log")
    services.airflow(["dags", "test", "monitor", "1987-03-02"], env, logs / "dags-test-monitor.log")
    first = _monitor_rows(env)
    assert set(first["day"]) == {"1987-03-02"} and "usa" in set(first["key"])
    champion = MlflowClient(env["FINSENT_TRACKING_URI"]).get_model_version_by_alias("finsent-sentiment", "champion")
    assert set(first["model_version"]) == {champion.version}

    # Drift: a day of Financial PhraseBank negatives (short, all negative, another register) instead of news.
    raw, _ = read_phrasebank(FPB_DIR)
    negatives = raw[raw["label"] == "negative"]["text"].drop_duplicates().head(200).tolist()
    folder = day_folder(state / "landing", DRIFT_DAY)
    folder.mkdir(parents=True)
    (folder / "fpb.jsonl").write_text("".join(json.dumps({"id": f"fpb-{i}", "text": text}) + "\n"
                                              for i, text in enumerate(negatives)))
    services.airflow(["dags", "unpause", "train"], env, logs / "airflow-cli.log")  # Airflow queues no paused DAG
    services.airflow(["dags", "test", "monitor", DRIFT_DAY.isoformat()], env, logs / "dags-test-monitor-drift.log")
    services.airflow(["dags", "pause", "train"], env, logs / "airflow-cli.log")  # no training under the scheduler below
    drift = json.loads((state.parent / "data" / "monitor" / f"date={DRIFT_DAY}" / "drift.json").read_text())
    assert drift["status"] == "checked" and drift["drifted"], drift
    database = _airflow_db(env)
    with sqlite3.connect(database) as connection:
        events = connection.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.name = 'finsent-drift'").fetchall()
        queued_for = {row[0] for row in connection.execute(
            "SELECT q.target_dag_id FROM asset_dag_run_queue q JOIN asset a ON a.id = q.asset_id "
            "WHERE a.name = 'finsent-drift'")}
    # The tiny champion's thresholds come from four days of corpus, so a real day may drift too: the
    # drift day's own event is the one asserted.
    extras = {extra["date"]: extra for extra in (json.loads(row[0]) for row in events)}
    assert set(extras[DRIFT_DAY.isoformat()]["fired"]) == set(drift["fired"])
    assert queued_for == {"train"}  # the train DAG is scheduled on the drift signal

    # A backfill over three days (03-02 again) under a real scheduler: one row set per day.
    services.airflow(["dags", "unpause", "monitor"], env, logs / "airflow-cli.log")
    scored_at = (state.parent / "data" / "monitor" / "date=1987-03-02" / "_score.json").stat().st_mtime_ns
    services.airflow(["backfill", "create", "--dag-id", "monitor", "--from-date", MONITOR_FIRST.isoformat(),
                      "--to-date", MONITOR_LAST.isoformat(), "--reprocess-behavior", "completed"],
                     env, logs / "airflow-cli.log")
    processes, _ = services.start_airflow_services(env, logs)
    days = {MONITOR_FIRST.isoformat(), "1987-03-02", MONITOR_LAST.isoformat()}
    try:
        # 03-02's run from `dags test` is cleared and run again by the backfill, keeping its run id.
        runs = services.wait_for_runs("monitor", env, lambda run: run["logical_date"][:10] in days, 3, timeout=600)
    finally:
        for process in reversed(processes):
            services.stop_process(process)
    assert len(runs) == 3 and all(r["state"] == "success" for r in runs), [(r["run_id"], r["state"]) for r in runs]
    assert (state.parent / "data" / "monitor" / "date=1987-03-02" / "_score.json").stat().st_mtime_ns > scored_at
    rows = _monitor_rows(env)
    assert set(rows["day"]) == {"1987-03-01", "1987-03-02", "1987-03-03", DRIFT_DAY.isoformat()}
    assert not rows.duplicated(["day", "dimension", "key"]).any()
    again = rows[rows["day"] == "1987-03-02"].drop(columns=["baseline_days", "decayed_net", "zscore"])
    pd.testing.assert_frame_equal(again.reset_index(drop=True),
                                  first.drop(columns=["baseline_days", "decayed_net", "zscore"]).reset_index(drop=True))


def test_second_run_sweeps_registers_the_best_and_the_gate_decides(pipeline_env, tmp_path):
    # A recipe file given as the DAG run's param: two seeds, so the train DAG maps fine-tuning over both
    # trials and registers the better one. Masked-LM adaptation is off this time (the first run covered it):
    # the trials start from the base. The environment's FINSENT_TRAIN__* variables would override the recipe.
    recipe = tmp_path / "two-seeds.yaml"
    recipe.write_text("# two seeds, no adaptation\nsweep_seeds: [0, 1]\nmlm_steps: 0\nepochs: 1\n")
    env = {k: v for k, v in pipeline_env.items() if k not in ("FINSENT_TRAIN__MLM_STEPS", "FINSENT_TRAIN__EPOCHS")}
    services.airflow(["dags", "test", "train", "--conf", json.dumps({"recipe": str(recipe)})], env,
                     Path(env["FINSENT_STATE_DIR"]) / "dags-test-train-recipe.log")
    _dags_test("release", env)
    client = MlflowClient(env["FINSENT_TRACKING_URI"])
    second = client.get_model_version("finsent-sentiment", "2")
    sweep = json.loads(Path(client.download_artifacts(second.run_id, "sweep/sweep_results.json")).read_text())
    scores = {t["trial"]: t["best_val_macro_f1"] for t in sweep["trials"]}
    assert sorted(scores) == [0, 1] and scores[sweep["best"]["trial"]] == max(scores.values())
    run = client.get_run(second.run_id)
    metrics = run.data.metrics
    assert run.data.params["mlm_used"] == "base" and "mlm_steps=0" in run.data.tags["mlm_decision"]
    assert {"best_val_macro_f1_trial0", "best_val_macro_f1_trial1"} <= set(metrics)
    assert metrics["epochs_run_trial0"] == metrics["epochs_run_trial1"] == 1
    assert run.data.tags["recipe"] == "two-seeds"
    assert Path(client.download_artifacts(second.run_id, "recipe/two-seeds.yaml")).read_text() == recipe.read_text()
    assert second.tags["gate_decision"] in {"promote", "reject"}
    assert "champion" in second.tags["gate_reason"]
    champion = client.get_model_version_by_alias("finsent-sentiment", "champion")
    assert champion.version == ("2" if second.tags["gate_decision"] == "promote" else "1")


def test_third_run_distills_the_champion_into_a_new_candidate(pipeline_env):
    # The champion teaches: the train DAG's fine-tuning step downloads it from the registry by its models:/ URI,
    # scores the training rows and 20 corpus sentences with it, and the student is registered as the candidate.
    # (`dags test` runs the tasks in one process; a worker's fresh process is covered in test_evaluation.py.)
    teacher = "models:/finsent-sentiment@champion"
    env = {**pipeline_env, "FINSENT_TRAIN__TEACHER_MODEL": teacher, "FINSENT_TRAIN__DISTILL_CORPUS_TEXTS": "20",
           "FINSENT_TRAIN__MLM_STEPS": "0", "FINSENT_TRAIN__EPOCHS": "1"}
    client = MlflowClient(env["FINSENT_TRACKING_URI"])
    champion = client.get_model_version_by_alias("finsent-sentiment", "champion")
    _dags_test("train", env)
    third = client.get_model_version("finsent-sentiment", "3")
    assert client.get_model_version_by_alias("finsent-sentiment", "candidate").version == "3"
    metrics = client.get_run(third.run_id).data.metrics
    assert metrics["distill_corpus_rows"] == 20
    # The teacher scored the validation split as the champion did when it was trained.
    champion_run = client.get_run(champion.run_id).data
    best_trial = champion_run.params.get("sweep_best_trial")  # the champion may be the sweep's winner
    champion_val = champion_run.metrics["best_val_macro_f1" + (f"_trial{best_trial}" if best_trial else "")]
    assert metrics["distill_teacher_val_macro_f1"] == pytest.approx(champion_val, abs=5e-4)
    distillation = json.loads(Path(client.download_artifacts(third.run_id, "distillation.json")).read_text())
    assert distillation["teacher"] == teacher and sum(distillation["corpus_labels"].values()) == 20
    card = Path(client.download_artifacts(third.run_id, "model_card.md")).read_text()
    assert f"fine-tuned teacher `{teacher}`" in card and "20 unlabeled corpus sentences" in card

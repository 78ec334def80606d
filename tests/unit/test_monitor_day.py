"""The monitor on real Reuters days with a tiny champion in a real MLflow
registry: scoring through the serving ONNX path, one row set per day however
often a day runs, alerts, drift, shadow scoring, the CLI, the report, the API,
and the clear failures (no champion, a corrupt partition)."""

from __future__ import annotations

import json
import shutil
from datetime import date

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipeline import registry
from pipeline.cli import main as finsent
from pipeline.config import MonitorConfig
from pipeline.data.landing import layout_reuters
from pipeline.monitor import MonitorError
from pipeline.monitor.jobs import build_index, detect_drift, monitor_partition, monitor_range, score_news, store_for
from serving.model import file_sha256
from tests.conftest import make_settings

FIRST, LAST = date(1987, 2, 26), date(1987, 3, 3)
BUSY = date(1987, 3, 2)
SMALL_DRIFT = {"drift_texts_per_day": 40, "drift_window_texts": 60, "drift_reference_texts": 150,
               "drift_calibration_windows": 40}


def _register(settings, model_dir) -> str:
    from pipeline.release.jobs import export_candidate

    run_id = registry.start_training_run(settings, "data-digest", "test-digest", "cache-key")
    version = registry.register_classifier(settings, run_id, model_dir).version
    export_candidate(settings, version)
    return version


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, ingested, tiny_classifier, mlflow_server, fpb_subset, reuters_subset, tiny_base):
    project = tmp_path_factory.mktemp("monitored") / "project"
    shutil.copytree(ingested.project_dir, project)
    settings = make_settings(project, fpb_subset, reuters_subset, tiny_base, tracking_uri=mlflow_server,
                             model_name="finsent-monitor-test", monitor=MonitorConfig(min_stories=3, **SMALL_DRIFT))
    layout_reuters(reuters_subset, settings.landing_zone)
    with pytest.raises(MonitorError, match="run the release first"):
        score_news(settings, BUSY)
    version = _register(settings, tiny_classifier)
    registry.connect(settings).set_registered_model_alias(settings.model_name, registry.CHAMPION, version)
    result = monitor_range(settings, FIRST, LAST)
    return settings, version, result


def test_each_day_is_scored_with_the_champion_and_every_row_names_it(monitored):
    settings, version, result = monitored
    assert result["days"] == 6 and result["days_with_news"] == 4  # 02-27 and 02-28 have no stories
    sha = file_sha256(next((settings.state_dir / "monitor" / "models").rglob("model.onnx")))
    store = store_for(settings)
    index = store.read("index", FIRST, LAST)
    assert sorted(index["day"].unique()) == ["1987-02-26", "1987-03-01", "1987-03-02", "1987-03-03"]
    assert set(index["model_version"]) == {version} and set(index["onnx_sha256"]) == {sha}
    overall = index[index["dimension"] == "overall"].set_index("day")
    assert overall["net_mean"].between(-1, 1).all()
    assert {"entity", "topic"} <= set(index["dimension"]) and "usa" in set(index["key"])
    stories = pd.read_parquet(monitor_partition(settings, BUSY) / "stories.parquet")
    originals = stories[stories["reprint_of"].isna()]
    assert overall.loc[BUSY.isoformat(), "stories"] == len(originals)
    assert originals["net_sentiment"].notna().all() and stories.loc[stories["reprint_of"].notna(), "net_sentiment"].isna().all()
    assert (stories["n_texts"].dropna() >= 1).all()
    curated = pd.read_parquet(settings.data_dir / "curated" / "news" / f"date={BUSY}" / "news.parquet")
    assert len(stories) == len(curated)  # every curated story is accounted for: scored, or a reprint of one


def test_rerunning_a_day_replaces_its_rows(monitored):
    settings, _, _ = monitored
    store = store_for(settings)
    before = {t: store.read(t, FIRST, LAST) for t in ("index", "alerts", "drift")}
    score_news(settings, BUSY)
    build_index(settings, BUSY)
    detect_drift(settings, BUSY)
    for table, rows in before.items():
        pd.testing.assert_frame_equal(store.read(table, FIRST, LAST), rows, check_like=True)


def test_drift_is_checked_against_calibrated_thresholds(monitored):
    settings, _, _ = monitored
    drift = json.loads((monitor_partition(settings, LAST) / "drift.json").read_text())
    assert drift["status"] == "checked" and set(drift["thresholds"]) == set(drift["statistics"])
    assert drift["reference"]["source"].endswith("reuters.parquet")
    assert all(0 <= v < float("inf") for v in drift["thresholds"].values())
    rows = store_for(settings).read("drift", LAST, LAST)
    assert len(rows) == len(drift["statistics"]) and rows["drifted"].sum() == len(drift["fired"])


def test_a_candidate_is_shadow_scored(monitored, tiny_classifier):
    settings, champion, _ = monitored
    candidate = _register(settings, tiny_classifier)  # the same weights: they must agree
    assert candidate != champion
    # The same variant for both: each version's default is its fastest blessed one, which may differ.
    pinned = settings.model_copy(update={"serving": settings.serving.model_copy(update={"variant": "fp32"})})
    try:
        scored = score_news(pinned, date(1987, 3, 3))
    finally:
        registry.connect(settings).set_registered_model_alias(settings.model_name, registry.CANDIDATE, champion)
    assert scored["shadow"]["candidate_version"] == candidate and scored["shadow"]["agreement"] == pytest.approx(1.0)
    row = store_for(settings).read("shadow", date(1987, 3, 3), date(1987, 3, 3))
    assert row["agreement"].tolist() == [pytest.approx(1.0)]


def test_cli_prints_the_index_and_alerts_and_writes_the_report(monitored, monkeypatch, capsys, tmp_path):
    settings, _, _ = monitored
    for key, value in {"FINSENT_PROJECT_DIR": settings.project_dir, "FINSENT_STATE_DIR": settings.state_dir,
                       "FINSENT_TRACKING_URI": settings.tracking_uri}.items():
        monkeypatch.setenv(key, str(value))
    assert finsent(["index", "--from", str(FIRST), "--to", str(LAST), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("day,dimension,key,stories,net_mean") and len(lines) == 5
    assert finsent(["index", "--from", str(FIRST), "--to", str(LAST), "--entity", "usa", "--format", "json"]) == 0
    assert {row["key"] for row in json.loads(capsys.readouterr().out)} == {"usa"}
    assert finsent(["alerts", "--from", str(FIRST), "--to", str(LAST), "--format", "json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    out = tmp_path / "report.html"
    assert finsent(["monitor-report", "--from", str(FIRST), "--to", str(LAST), "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.is_file() and "data:image/png;base64," in out.read_text()
    run = registry.connect_uri(settings.tracking_uri).get_run(result["mlflow_run_id"])
    assert "overall_net_mean" in run.data.metrics
    history = registry.connect_uri(settings.tracking_uri).get_metric_history(run.info.run_id, "overall_net_mean")
    assert len(history) == 4


def test_the_api_serves_the_index(monitored):
    from serving.app import create_app

    settings, _, _ = monitored
    with TestClient(create_app(settings.model_copy(update={"tracking_uri": settings.tracking_uri}))) as client:
        answer = client.get("/v1/index", params={"from": str(FIRST), "to": str(LAST)})
        assert answer.status_code == 200 and len(answer.json()["rows"]) == 4
        usa = client.get("/v1/index", params={"from": str(FIRST), "to": str(LAST), "entity": "usa"}).json()
        assert usa["dimension"] == "entity" and usa["rows"]
        assert client.get("/v1/index", params={"from": str(LAST), "to": str(FIRST)}).status_code == 422
        assert client.get("/v1/index", params={"from": "yesterday", "to": str(LAST)}).status_code == 422


def test_a_corrupt_partition_is_reported_with_its_path(monitored, tmp_path):
    settings, _, _ = monitored
    broken = settings.model_copy(update={"project_dir": tmp_path})
    partition = broken.data_dir / "curated" / "news" / f"date={BUSY}"
    partition.mkdir(parents=True)
    (partition / "news.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MonitorError, match=f"corrupt Parquet partition .*date={BUSY}"):
        score_news(broken, BUSY)


def test_a_day_without_news_is_a_no_op(monitored, caplog):
    settings, _, _ = monitored
    with caplog.at_level("INFO"):
        assert score_news(settings, date(1987, 2, 27))["status"] == "no news"
    assert "no news for 1987-02-27" in caplog.text

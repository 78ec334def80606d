"""`airflow backfill create` over a range of Reuters days, run by a real
scheduler, yields the same curated news partitions as ingesting each day on
its own; days without landing files are clean no-ops."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, timedelta

import pytest

from pipeline import services
from pipeline.data.landing import layout_reuters
from pipeline.data.news import ingest_news_day
from tests.conftest import REPO, TEST_INGEST_ENV, make_settings

pytestmark = pytest.mark.e2e
# One day without stories, then two with: each run costs a scheduler round of four tasks.
FIRST, LAST = date(1987, 2, 28), date(1987, 3, 2)


def _partitions(settings) -> dict[str, bytes]:
    root = settings.data_dir / "curated" / "news"
    return {p.parent.name: p.read_bytes() for p in sorted(root.glob("date=*/news.parquet"))}


def test_backfill_matches_day_by_day_runs(tmp_path, fpb_subset, reuters_subset, tiny_base):
    backfilled = make_settings(tmp_path / "backfill", fpb_subset, None, tiny_base)
    one_by_one = make_settings(tmp_path / "daily", fpb_subset, None, tiny_base)
    for settings in (backfilled, one_by_one):
        settings.project_dir.mkdir()
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=settings.project_dir, check=True)
        layout_reuters(reuters_subset, settings.landing_zone)

    day = FIRST
    while day <= LAST:
        ingest_news_day(one_by_one, day)
        day += timedelta(days=1)

    base = {k: v for k, v in os.environ.items() if not k.startswith(("FINSENT_", "AIRFLOW"))}
    env = services.airflow_env(backfilled.state_dir / "airflow", REPO / "dags", {
        **base,
        "FINSENT_PROJECT_DIR": str(backfilled.project_dir),
        "FINSENT_STATE_DIR": str(backfilled.state_dir),
        "FINSENT_FPB_DIR": str(fpb_subset),
        **TEST_INGEST_ENV,
    })
    logs = backfilled.state_dir / "logs"
    services.migrate_airflow_db(env, logs / "airflow-db.log")
    # The backfill is created before the scheduler starts, as on a quiet
    # deployment: SQLite then has one writer and the CLI never waits for it.
    services.airflow(["dags", "reserialize"], env, logs / "airflow-cli.log")
    services.airflow(["dags", "unpause", "ingest"], env, logs / "airflow-cli.log")
    services.airflow(
        ["backfill", "create", "--dag-id", "ingest", "--from-date", FIRST.isoformat(), "--to-date", LAST.isoformat(),
         "--max-active-runs", "1"],
        env, logs / "airflow-cli.log",
    )
    processes, _ = services.start_airflow_services(env, logs)
    try:
        runs = services.wait_for_runs("ingest", env, lambda run: run["run_id"].startswith("backfill__"),
                                      (LAST - FIRST).days + 1, timeout=420)
    finally:
        for process in reversed(processes):
            services.stop_process(process)

    assert len(runs) == (LAST - FIRST).days + 1, [(r["run_id"], r["state"]) for r in runs]
    assert all(r["state"] == "success" for r in runs), [(r["run_id"], r["state"]) for r in runs]
    produced = _partitions(backfilled)
    # 1987-02-28 has no stories: no partition, no failure.
    assert sorted(produced) == ["date=1987-03-01", "date=1987-03-02"]
    assert produced == _partitions(one_by_one)
    assert (backfilled.project_dir / "data.dvc").is_file()

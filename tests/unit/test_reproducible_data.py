"""Ingest is byte-for-byte deterministic: the same inputs as ``make demo``
give exactly the digest recorded in the committed ``data.dvc``."""

import subprocess
import sys
from datetime import date

from pipeline.config import Settings
from pipeline.data.ingest import ingest
from pipeline.data.landing import layout_reuters
from pipeline.data.version import read_digest
from pipeline.demo import DAG_RUNS
from tests.conftest import FPB_DIR, REPO, REUTERS_DIR


def test_demo_inputs_reproduce_the_committed_digest(tmp_path):
    settings = Settings(project_dir=tmp_path, state_dir=tmp_path / ".finsent", fpb_dir=FPB_DIR, reuters_dir=REUTERS_DIR)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    layout_reuters(REUTERS_DIR, settings.landing_zone)
    news_day = date.fromisoformat(dict(DAG_RUNS)["ingest"])
    result = ingest(settings, news_day)
    assert result["news"]["clean"] > 0
    assert result["digest"] == read_digest(REPO)

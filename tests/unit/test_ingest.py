import json
import subprocess
import sys

import pandas as pd

from pipeline.data.ingest import ingest, load_split
from pipeline.data.version import read_digest
from tests.conftest import TEST_INGEST_ENV, make_settings


def test_ingest_writes_versioned_splits_and_reconciles(ingested):
    labeled = {name: load_split(ingested.labeled_dir, name) for name in ("train", "validation", "test")}
    assert all(len(frame) for frame in labeled.values())
    assert list(labeled["train"].columns) == ["id", "text", "label", "agreement", "source", "line"]
    union = pd.concat(labeled.values())
    assert union["text"].is_unique
    digest = read_digest(ingested.project_dir)
    assert digest.endswith(".dir")
    remote = ingested.state_dir / "dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push put nothing in the remote"
    corpus = pd.read_parquet(ingested.corpus_path)
    assert len(corpus) > 900
    for suite in ("labeled_text", "unlabeled_corpus"):
        index = ingested.data_docs_dir / suite / "index.html"
        assert index.is_file() and suite in index.read_text(), f"no Data Docs for {suite}"


def test_rerun_replaces_output_with_the_same_digest(tmp_path, fpb_subset, tiny_base):
    settings = make_settings(tmp_path, fpb_subset, None, tiny_base)
    first = ingest(settings)
    second = ingest(settings)
    assert first["digest"] == second["digest"]
    assert first["rows_in"] == first["clean"] + first["quarantined"] + first["duplicates"]
    assert sorted(p.name for p in settings.labeled_dir.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]


def test_cli_prints_counts_as_last_line(tmp_path, fpb_subset):
    env = {
        "PATH": "/usr/bin:/bin", "FINSENT_PROJECT_DIR": str(tmp_path), "FINSENT_STATE_DIR": str(tmp_path / "state"),
        "FINSENT_FPB_DIR": str(fpb_subset), **TEST_INGEST_ENV, "DVC_NO_ANALYTICS": "1",
    }
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest"], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows_in"] == result["clean"] + result["quarantined"] + result["duplicates"]
    assert result["digest"] == read_digest(tmp_path)


def test_training_refuses_a_silently_changed_test_set(tmp_path, fpb_subset, tiny_base):
    import pytest

    from pipeline.data.frozen import FrozenTestSetChanged, freeze_test_set, read_frozen, require_frozen_test_set

    settings = make_settings(tmp_path, fpb_subset, None, tiny_base)
    first = ingest(settings)
    assert read_frozen(tmp_path)["test_digest"] == first["test_digest"] and not first["test_changed"]
    test = load_split(settings.labeled_dir, "test")
    assert require_frozen_test_set(tmp_path, test) == first["test_digest"]
    changed = test.iloc[1:]
    with pytest.raises(FrozenTestSetChanged, match="finsent freeze-test"):
        require_frozen_test_set(tmp_path, changed)
    freeze_test_set(tmp_path, changed)  # deliberate re-freeze
    assert require_frozen_test_set(tmp_path, changed) != first["test_digest"]

"""`finsent ingest --source URI --out DIR` on CSV / JSONL / Parquet sources."""

import csv
import json
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.data.sources import read_labeled_source, read_phrasebank
from pipeline.data.tabular import SourceError
from pipeline.data.version import read_digest
from tests.conftest import TEST_INGEST_ENV


@pytest.fixture(scope="module")
def fpb_rows(fpb_subset):
    raw, _ = read_phrasebank(fpb_subset)
    return raw[["text", "label"]]


def _run_ingest(tmp_path, *args, id_column=None):
    env = {
        "PATH": "/usr/bin:/bin", "FINSENT_STATE_DIR": str(tmp_path / "state"),
        **TEST_INGEST_ENV, "DVC_NO_ANALYTICS": "1",
        "FINSENT_INGEST__TEXT_COLUMN": "headline", "FINSENT_INGEST__LABEL_COLUMN": "sentiment",
        **({"FINSENT_INGEST__ID_COLUMN": id_column} if id_column else {}),
    }
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", *args], env=env, capture_output=True, text=True)


def test_csv_source_with_a_column_mapping_and_bad_rows(tmp_path, fpb_rows):
    source = tmp_path / "labeled.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["headline", "sentiment"])
        writer.writerows(fpb_rows.values.tolist())
        writer.writerows([["", "neutral"], ["Shares jumped", "bullish"], ["Shares jumped", "positive"],
                          ["Profit rose â€™ sharply", "positive"]])
    done = _run_ingest(tmp_path, "--source", str(source), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows_in"] == len(fpb_rows) + 4
    assert result["rows_in"] == result["clean"] + result["quarantined"] + result["duplicates"]
    assert result["digest"] == read_digest(tmp_path / "out")
    reasons = pd.read_parquet(tmp_path / "out" / "data" / "quarantine" / "labeled.parquet")["reason"].tolist()
    assert "empty text" in reasons and "unknown label 'bullish'" in reasons
    # Caught by the Great Expectations suite rather than by cleaning: still one reason per row.
    assert "non-printable or garbled characters (expect_column_values_to_not_match_regex)" in reasons
    assert 0 <= result["tokens"]["truncated_share"] < 0.02


def test_ids_from_the_source_must_be_unique(tmp_path, fpb_rows):
    source = tmp_path / "labeled.jsonl"
    rows = [{"key": f"r{i}", "headline": t, "sentiment": lbl} for i, (t, lbl) in enumerate(fpb_rows.values.tolist())]
    rows[1]["key"] = rows[0]["key"]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    done = _run_ingest(tmp_path, "--source", str(source), "--out", str(tmp_path / "out"), id_column="key")
    assert done.returncode != 0
    assert "expect_column_values_to_be_unique" in done.stderr and "'column': 'id'" in done.stderr
    assert "'unexpected_count': 2" in done.stderr


def test_jsonl_and_parquet_sources_read_the_same_rows(tmp_path, fpb_rows):
    renamed = fpb_rows.rename(columns={"text": "headline", "label": "sentiment"})
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in renamed.to_dict("records")))
    renamed.to_parquet(tmp_path / "b.parquet")
    from_jsonl, _ = read_labeled_source(str(tmp_path / "a.jsonl"), "headline", "sentiment")
    from_parquet, _ = read_labeled_source(str(tmp_path / "b.parquet"), "headline", "sentiment")
    assert from_jsonl[["text", "label"]].values.tolist() == fpb_rows.values.tolist()
    assert from_parquet[["text", "label"]].values.tolist() == fpb_rows.values.tolist()
    folder, _ = read_labeled_source(str(tmp_path), "headline", "sentiment")  # a folder of files
    assert len(folder) == 2 * len(fpb_rows)


def test_a_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        read_labeled_source(str(tmp_path / "nope.csv"))
    done = _run_ingest(tmp_path, "--source", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out"))
    assert done.returncode != 0 and "nope.csv: no such file or folder" in done.stderr


def test_null_and_non_string_texts_are_quarantined_not_crashing(tmp_path):
    from pipeline.config import IngestConfig
    from pipeline.data.clean import clean_labeled

    pd.DataFrame({"headline": ["Profit rose sharply", None], "sentiment": ["positive", "neutral"]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"headline": [7], "sentiment": ["neutral"]}).to_parquet(tmp_path / "b.parquet")  # wrong type
    raw, agreement = read_labeled_source(str(tmp_path), "headline", "sentiment")
    result = clean_labeled(raw, agreement, IngestConfig())
    assert result.counts == {"rows_in": 3, "clean": 1, "quarantined": 2, "duplicates": 0}
    assert sorted(result.quarantine["reason"]) == ["'headline' is int, not a string", "missing text"]
    # No annotator agreement in this source: recorded as 100, so soft targets keep the label hard.
    assert agreement == {} and result.clean["agreement"].tolist() == [100]

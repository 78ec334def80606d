"""What the data plane refuses to read, and what it refuses to lose: protocols
the settings do not allow, files that link out of their source folder, JSONL
and CSV records too large or nested too deep, ids shared by different texts,
and a ``data.dvc`` that would name data the remote never got."""

import json
import os
import re
from datetime import date
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from pipeline.config import IngestConfig, Settings
from pipeline.data.clean import ID_CONFLICT, clean_labeled
from pipeline.data.landing import day_folder
from pipeline.data.news import ingest_news_day, news_partition, news_quarantine
from pipeline.data.sources import read_labeled_source
from pipeline.data.tabular import ColumnMapping, SourceError, read_table, url_protocols
from pipeline.data.version import read_digest, version_data
from tests.conftest import make_settings

MAPPING = ColumnMapping(text="text", label="label", id="id")
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture()
def news_settings(tmp_path, fpb_subset, tiny_base):
    return make_settings(tmp_path, fpb_subset, None, tiny_base)


@pytest.fixture()
def opened(monkeypatch) -> list[str]:
    """The URLs fsspec opens during the test."""
    urls: list[str] = []
    original = fsspec.open

    def spy(url, *args, **kwargs):
        urls.append(url)
        return original(url, *args, **kwargs)

    monkeypatch.setattr(fsspec, "open", spy)
    return urls


def _jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


@pytest.mark.parametrize(("url", "protocol"), [
    ("http://example.com/x.csv", "http"), ("https://example.com/x.jsonl", "https"), ("ftp://example.com/x.csv", "ftp"),
    ("memory://x.csv", "memory"), ("simplecache::https://example.com/x.csv", "simplecache"), ("data:,a", "data"),
])
def test_a_protocol_the_settings_do_not_allow_is_refused_unopened(opened, url, protocol):
    expected = rf"protocol '{protocol}' is not allowed for sources \(allowed: local files, s3, s3a\); add it to " \
               r"FINSENT_INGEST__SOURCE_PROTOCOLS"
    with pytest.raises(SourceError, match=expected):
        read_table(url, MAPPING)
    with pytest.raises(SourceError, match=expected):
        read_labeled_source(url, cfg=IngestConfig())
    assert opened == []


def test_protocols_are_read_as_fsspec_reads_them():
    assert url_protocols("/data/x.csv") == [] and url_protocols("relative/x.csv") == []
    assert url_protocols("S3://bucket/x.csv") == ["s3"]
    assert url_protocols("simplecache::s3://bucket/x.csv") == ["simplecache", "s3"]
    assert url_protocols("zip://x.csv::https://example.com/a.zip") == ["zip", "https"]


def test_a_listed_protocol_is_read(monkeypatch):
    url = "memory://finsent-hardening/x.csv"
    with fsspec.open(url, "wb") as handle:
        handle.write(b"text,label\nProfit rose,positive\n")
    try:
        frame = read_table(url, MAPPING, cfg=IngestConfig(source_protocols=["memory"]))
    finally:
        fsspec.filesystem("memory").rm(url)
    assert frame["text"].tolist() == ["Profit rose"]
    for key in [k for k in os.environ if k.startswith("FINSENT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FINSENT_INGEST__SOURCE_PROTOCOLS", '["s3", "memory"]')
    assert Settings().ingest.source_protocols == ["s3", "memory"]


def test_a_folder_source_refuses_files_that_link_out_of_it(tmp_path, opened):
    source = tmp_path / "source"
    source.mkdir()
    (source / "good.csv").write_text("text,label\nProfit rose,positive\n")
    (source / "inside.csv").symlink_to(source / "good.csv")  # a link that stays in the folder is read
    raw, _ = read_labeled_source(str(source))
    assert raw["text"].tolist() == ["Profit rose", "Profit rose"]
    outside = tmp_path / "outside.csv"
    outside.write_text("text,label\nNot in the source,neutral\n")
    for name, target in {"escape.csv": outside, "passwd.csv": Path("/etc/passwd")}.items():
        (source / name).symlink_to(target)
        message = rf"{name}: a link to {re.escape(str(target.resolve()))}, outside the source folder .*; not read"
        with pytest.raises(SourceError, match=message):
            read_labeled_source(str(source))
        (source / name).unlink()
    assert all(Path(url).resolve().parent == source.resolve() for url in opened)


def test_a_landing_file_that_links_out_of_its_day_is_quarantined_unread(news_settings, tmp_path):
    day = date(1987, 3, 4)
    folder = day_folder(news_settings.landing_zone, day)
    folder.mkdir(parents=True)
    stories = [{"id": f"s{i}", "text": f"Story {i} about profits ."} for i in range(4)]
    (folder / "feed.jsonl").write_text(_jsonl(*stories))
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(_jsonl({"id": "x", "text": "Not a story of this day ."}))
    (folder / "linked.jsonl").symlink_to(outside)
    (folder / "passwd.csv").symlink_to("/etc/passwd")

    result = ingest_news_day(news_settings, day)
    reasons = {Path(error["file"]).name: error["reason"] for error in result["file_errors"]}
    assert set(reasons) == {"linked.jsonl", "passwd.csv"}
    assert all("outside the source folder" in reason for reason in reasons.values())
    reported = json.loads(news_quarantine(news_settings, day).with_suffix(".files.json").read_text())
    assert reported == result["file_errors"]
    assert result["files_quarantined"] == 2 and result["rows_in"] == result["clean"] == 4
    curated = pd.read_parquet(news_partition(news_settings, day) / "news.parquet")
    assert "Not a story of this day ." not in set(curated["text"])


def test_too_deep_and_too_large_jsonl_lines_are_row_errors(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(_jsonl(
        {"id": "1", "text": "Profit rose", "label": "positive"},
        DEEP,
        {"id": "2", "text": "Costs fell", "label": "positive", "extra": [[[[1]]]]},
        {"id": "3", "text": "y" * 2000, "label": "neutral"},
        {"id": "4", "text": "[" * 200 + "{" * 200, "label": "neutral"},  # brackets inside a string do not nest
        '{"id": "5", "text": "deep", "label": "neutral", "extra": ' + "[" * 65 + "]" * 65 + "}",
    ))
    frame = read_table(str(path), MAPPING, cfg=IngestConfig(max_line_bytes=1000))
    errors = [e if isinstance(e, str) else None for e in frame["error"]]
    assert frame["line"].tolist() == [1, 2, 3, 4, 5, 6]
    assert errors == [
        None, "200000 bytes, over the 1000-byte limit (FINSENT_INGEST__MAX_LINE_BYTES)", None,
        f"{len(path.read_text().splitlines()[3])} bytes, over the 1000-byte limit (FINSENT_INGEST__MAX_LINE_BYTES)",
        None, "JSON nested deeper than 64 levels (FINSENT_INGEST__MAX_JSON_DEPTH)",
    ]
    frame = read_table(str(path), MAPPING)  # the default size limit lets the deep line through to the depth check
    assert frame["error"].iloc[1] == "JSON nested deeper than 64 levels (FINSENT_INGEST__MAX_JSON_DEPTH)"


def test_a_deep_line_in_a_labeled_source_is_quarantined_and_counts_reconcile(tmp_path):
    (tmp_path / "labeled.jsonl").write_text(_jsonl(
        {"text": "Profit rose sharply", "label": "positive"}, DEEP, {"text": "Sales were flat", "label": "neutral"}))
    raw, agreement = read_labeled_source(str(tmp_path), cfg=IngestConfig())
    result = clean_labeled(raw, agreement, IngestConfig())
    assert result.reconcile() == {"rows_in": 3, "clean": 2, "quarantined": 1, "duplicates": 0}
    assert result.quarantine["reason"].tolist() == [
        "JSON nested deeper than 64 levels (FINSENT_INGEST__MAX_JSON_DEPTH)"]


def test_an_over_long_csv_record_is_a_row_error(tmp_path):
    path = tmp_path / "in.csv"
    record = '2,"' + "a line of a long story\n" * 50 + '",neutral\n'
    path.write_text("id,text,label\n1,Profit rose,positive\n" + record + "3,Costs fell,negative\n")
    frame = read_table(str(path), MAPPING, cfg=IngestConfig(max_line_bytes=1000))
    errors = [e if isinstance(e, str) else None for e in frame["error"]]
    assert frame["line"].tolist() == [2, 3, 54]
    assert errors == [None, f"{len(record)} bytes, over the 1000-byte limit (FINSENT_INGEST__MAX_LINE_BYTES)", None]
    assert frame["text"].tolist()[::2] == ["Profit rose", "Costs fell"]


def test_a_news_day_quarantines_bad_lines_and_id_conflicts_and_reconciles(news_settings):
    day = date(1987, 3, 5)
    folder = day_folder(news_settings.landing_zone, day)
    folder.mkdir(parents=True)
    (folder / "feed.jsonl").write_text(_jsonl(
        {"id": "a", "text": "Shares rose ."},
        DEEP,
        {"id": "big", "text": "y" * 300_000},
        {"id": "a", "text": "Shares rose ."},  # the same story again: a duplicate
        {"id": "b", "text": "Profit fell ."},
        {"id": "b", "text": "Sales rose ."},  # the same id as a different story: a conflict
        {"id": "c", "text": "Costs fell ."},
        {"id": "d", "text": "Orders grew ."},
    ))
    # Large enough for the deep line (200,000 bytes) to reach the depth check.
    lenient = news_settings.ingest.model_copy(update={"max_line_bytes": 250_000, "min_clean_share": 0.4})
    result = ingest_news_day(news_settings.model_copy(update={"ingest": lenient}), day)
    assert {k: result[k] for k in ("rows_in", "clean", "quarantined", "duplicates")} == {
        "rows_in": 8, "clean": 3, "quarantined": 4, "duplicates": 1}
    stories = pd.read_parquet(news_partition(news_settings, day) / "news.parquet")
    assert stories["text"].tolist() == ["Shares rose .", "Costs fell .", "Orders grew ."]
    quarantine = pd.read_parquet(news_quarantine(news_settings, day))
    reasons = dict(zip(quarantine["line"], quarantine["reason"]))
    assert reasons == {
        2: "JSON nested deeper than 64 levels (FINSENT_INGEST__MAX_JSON_DEPTH)",
        3: f"{len(json.dumps({'id': 'big', 'text': 'y' * 300_000}))} bytes, over the 250000-byte limit "
           "(FINSENT_INGEST__MAX_LINE_BYTES)",
        5: ID_CONFLICT, 6: ID_CONFLICT,
    }


def test_a_failed_push_leaves_data_dvc_as_it_was(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "a.txt").write_text("first\n")
    pointer = project / "data.dvc"
    # Nothing can be created under a regular file, not even by root: the push fails.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unreachable, remote = str(blocker / "remote"), str(tmp_path / "remote")

    with pytest.raises(RuntimeError, match=r"versioning data/ to the DVC remote .* failed; data\.dvc was not written"):
        version_data(project, unreachable)
    assert not pointer.exists()

    first = version_data(project, remote)
    before = pointer.read_bytes()
    (project / "data" / "a.txt").write_text("second\n")
    with pytest.raises(RuntimeError, match=r"(?s)data\.dvc was left as it was.*dvc push.*Not a directory"):
        version_data(project, unreachable)
    assert pointer.read_bytes() == before and read_digest(project) == first

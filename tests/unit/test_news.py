"""Daily news partitions: landing layout, idempotent day runs, no-op days,
and bad input that ends in quarantine or a clear error naming the file."""

import json
from datetime import date

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.landing import day_folder, layout_reuters
from pipeline.data.news import as_tags, ingest_news_day, load_news, news_partition, news_quarantine, news_report
from pipeline.data.tabular import ColumnMapping, SourceError, read_table
from pipeline.data.validate import DataValidationError
from tests.conftest import make_settings


@pytest.fixture()
def news_settings(tmp_path, fpb_subset, tiny_base):
    return make_settings(tmp_path, fpb_subset, None, tiny_base)


def test_reuters_layout_is_one_folder_per_date_and_repeatable(tmp_path, reuters_subset):
    landing = tmp_path / "landing"
    counts = layout_reuters(reuters_subset, landing)
    assert sum(counts.values()) >= 900
    assert all(day.startswith("1987-") for day in counts)
    first = {p: p.read_bytes() for p in landing.rglob("*.jsonl")}
    layout_reuters(reuters_subset, landing)
    assert {p: p.read_bytes() for p in landing.rglob("*.jsonl")} == first
    story = json.loads(next(iter(first.values())).splitlines()[0])
    assert set(story) == {"id", "timestamp", "title", "text", "entities", "topics", "source"}


def test_reuters_stories_keep_their_title_and_tags(news_settings, reuters_subset):
    counts = layout_reuters(reuters_subset, news_settings.landing_zone)
    day = date.fromisoformat(max(counts, key=counts.get))
    ingest_news_day(news_settings, day)
    stories = pd.read_parquet(news_partition(news_settings, day) / "news.parquet")
    assert stories["title"].notna().mean() > 0.9
    assert not stories["title"].str.contains("&lt;|&#", regex=True).any()
    tagged = stories[stories["topics"].map(len) > 0]
    assert len(tagged) and all(isinstance(t, str) and t == t.strip() for ts in tagged["topics"] for t in ts)
    assert stories["entities"].map(len).sum() > 0


def test_tag_cells_become_lists():
    assert as_tags("NOK| ELQ ;NOK") == ["NOK", "ELQ"]
    assert as_tags(["usa", "usa", " uk "]) == ["usa", "uk"]
    assert as_tags(None) == [] and as_tags(float("nan")) == [] and as_tags("") == []


def test_a_day_replaces_its_own_partition(news_settings, reuters_subset):
    counts = layout_reuters(reuters_subset, news_settings.landing_zone)
    day = date.fromisoformat(max(counts, key=counts.get))
    first = ingest_news_day(news_settings, day)
    assert first["rows_in"] == counts[day.isoformat()]
    assert first["rows_in"] == first["clean"] + first["quarantined"] + first["duplicates"]
    written = (news_partition(news_settings, day) / "news.parquet").read_bytes()
    again = ingest_news_day(news_settings, day)
    assert again["clean"] == first["clean"]
    assert (news_partition(news_settings, day) / "news.parquet").read_bytes() == written
    assert len(load_news(news_settings)) == first["clean"]


def test_a_range_report_sums_the_days_and_reconciles(news_settings, reuters_subset):
    counts = layout_reuters(reuters_subset, news_settings.landing_zone)
    days = [date(1987, 2, 26), date(1987, 2, 27), date(1987, 3, 1)]
    results = [ingest_news_day(news_settings, day) for day in days]
    report = news_report(news_settings, days[0], days[-1])
    assert report["days_ingested"] == 2 == sum(day.isoformat() in counts for day in days)
    assert report["days_without_partition"] == ["1987-02-27", "1987-02-28"]
    for key in ("rows_in", "clean", "quarantined", "duplicates"):
        assert report[key] == sum(r[key] for r in results)
    assert report["rows_in"] == sum(counts.get(day.isoformat(), 0) for day in days)
    assert report["reconciled"]


def test_a_day_without_files_is_a_no_op(news_settings):
    result = ingest_news_day(news_settings, date(1987, 1, 1))
    assert result["status"] == "no files" and result["rows_in"] == 0
    assert not news_partition(news_settings, date(1987, 1, 1)).exists()


def test_bad_rows_and_bad_files_are_quarantined_and_good_rows_kept(news_settings):
    day = date(1987, 3, 2)
    folder = day_folder(news_settings.landing_zone, day)
    folder.mkdir(parents=True)
    lines = [
        json.dumps({"id": "a", "text": "Shares rose ."}).encode(),
        b'{"id": "b", "text": "broken JSON"',
        json.dumps({"id": "c", "text": "   "}).encode(),
        json.dumps({"id": "d", "text": "NUL \u0000 inside"}).encode(),
        b'{"id": "e", "text": "bad byte \xff here"}',
        json.dumps({"id": "f", "text": "x" * 100_001}).encode(),
        json.dumps({"id": "a", "text": "Shares rose ."}).encode(),  # same id, same text: a duplicate
        json.dumps({"id": "g", "text": 42}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"id": "h", "text": "Profit fell ."}).encode(),
        json.dumps({"id": "i", "text": "Sales rose \ufffd ."}).encode(),
    ]
    (folder / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "no_text.csv").write_text("id,body\n1,hello\n")
    (folder / "truncated.parquet").write_bytes(b"PAR1\x00\x00garbage")
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["Good parquet row .", None]}), folder / "typed.parquet")
    pq.write_table(pa.table({"id": ["w1"], "text": pa.array([7], pa.int64())}), folder / "wrong_types.parquet")

    # 3 of 14 rows are clean: below the threshold the day fails, naming the quarantine it wrote.
    with pytest.raises(DataValidationError, match=r"only 23.1% of 13 distinct rows are clean \(threshold 50%\); 10 quarantined"):
        ingest_news_day(news_settings, day)
    assert len(pd.read_parquet(news_quarantine(news_settings, day))) == 10
    assert not news_partition(news_settings, day).exists()

    lenient_ingest = news_settings.ingest.model_copy(update={"min_clean_share": 0.2, "max_garbled_share": 0.5})
    lenient = news_settings.model_copy(update={"ingest": lenient_ingest})
    result = ingest_news_day(lenient, day)
    assert result["rows_in"] == 14
    assert result["rows_in"] == result["clean"] + result["quarantined"] + result["duplicates"]
    assert result["duplicates"] == 1
    clean = pd.read_parquet(news_partition(news_settings, day) / "news.parquet")
    assert set(clean["text"]) == {"Shares rose .", "Profit fell .", "Good parquet row ."}
    reasons = pd.read_parquet(news_quarantine(news_settings, day))["reason"].tolist()
    assert any(r.startswith("invalid JSON") for r in reasons)
    assert "empty text" in reasons and "control characters in text" in reasons
    assert any("not valid utf-8" in r for r in reasons)
    assert any(r.startswith("text length 100001") for r in reasons)
    assert sum("int, not a string" in r for r in reasons) == 2  # a JSON number and a Parquet int64 column
    assert any("list, not an object" in r for r in reasons)
    assert "missing text" in reasons
    assert "non-printable or garbled characters (expect_column_values_to_not_match_regex)" in reasons
    bad_files = {e["file"].rsplit("/", 1)[-1]: e["reason"] for e in result["file_errors"]}
    assert set(bad_files) == {"no_text.csv", "truncated.parquet"}
    assert "no column 'text'" in bad_files["no_text.csv"]
    assert "unreadable Parquet" in bad_files["truncated.parquet"]


def test_column_mapping_reads_other_names(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("headline,sentiment,ticker\nProfit rose,positive,NOK\n")
    frame = read_table(str(path), ColumnMapping(text="headline", label="sentiment", entity="ticker"))
    assert frame[["text", "label", "entity"]].values.tolist() == [["Profit rose", "positive", "NOK"]]
    with pytest.raises(SourceError, match="no column 'label'"):
        read_table(str(path), ColumnMapping(text="headline", label="label"))


def test_news_columns_are_mapped_from_the_settings(news_settings):
    day = date(1987, 3, 3)
    folder = day_folder(news_settings.landing_zone, day)
    folder.mkdir(parents=True)
    (folder / "feed.csv").write_text(
        'story_id,published,headline,ticker,publisher\n'
        'n1,1987-03-03T09:00:00,"Nokia profit rose,\nsales grew",NOK,wire\n'
        'n2,1987-03-03T10:00:00,Elcoteq cut jobs,ELQ,wire\n'
    )
    mapped = news_settings.ingest.model_copy(update={
        "text_column": "headline", "id_column": "story_id", "timestamp_column": "published",
        "entity_column": "ticker", "source_column": "publisher"})
    result = ingest_news_day(news_settings.model_copy(update={"ingest": mapped}), day)
    assert result["clean"] == 2
    clean = pd.read_parquet(news_partition(news_settings, day) / "news.parquet")
    assert clean[["id", "source"]].values.tolist() == [["n1", "wire"], ["n2", "wire"]]
    assert [list(e) for e in clean["entities"]] == [["NOK"], ["ELQ"]]
    assert clean["text"].tolist()[0] == "Nokia profit rose, sales grew"  # one record over two lines, normalised

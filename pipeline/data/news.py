"""Daily news partitions: ``landing/<day>/*`` → ``data/curated/news/date=<day>/``.

A day is processed on its own and replaces its own output, so re-running a
day, or backfilling a range, gives the same curated data as running each day
once. A day with no landing folder is a no-op."""

from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path

import pandas as pd

from pipeline.config import Settings
from pipeline.data.clean import text_problem
from pipeline.data.landing import day_files
from pipeline.data.sources import normalize_value
from pipeline.data.tabular import STANDARD_COLUMNS, ColumnMapping, SourceError, read_table
from pipeline.data.validate import validate_corpus

log = logging.getLogger(__name__)

NEWS_MAPPING = ColumnMapping(text="text", id="id", timestamp="timestamp", source="source")
NEWS_COLUMNS = ["id", "timestamp", "text", "source"]


def news_partition(settings: Settings, day: date) -> Path:
    return settings.data_dir / "curated" / "news" / f"date={day.isoformat()}"


def news_quarantine(settings: Settings, day: date) -> Path:
    return settings.quarantine_dir / "news" / f"date={day.isoformat()}.parquet"


def ingest_news_day(settings: Settings, day: date, mapping: ColumnMapping = NEWS_MAPPING) -> dict:
    """Reads the day's landing files, cleans, validates and writes its partition."""
    files = day_files(settings.landing_zone, day)
    counts = {"date": day.isoformat(), "files": len(files), "rows_in": 0, "clean": 0, "quarantined": 0, "duplicates": 0}
    if not files:
        log.info("no landing files for %s in %s: nothing to do", day, settings.landing_zone)
        return {**counts, "status": "no files"}

    frames, file_errors = [], []
    for path in files:
        try:
            frames.append(read_table(str(path), mapping))
        except SourceError as err:  # the file goes to quarantine whole; the day goes on
            file_errors.append({"file": str(path), "reason": str(err)})
    counts["files_quarantined"] = len(file_errors)
    raw = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STANDARD_COLUMNS)
    raw["text"] = raw["text"].map(normalize_value)
    raw["reason"] = [text_problem(t, e, 1, settings.ingest.max_news_chars) for t, e in zip(raw["text"], raw["error"])]
    bad = raw[raw["reason"].notna()]
    good = raw[raw["reason"].isna()]
    good = good.assign(id=good["id"].where(good["id"].notna(), good["file"] + ":" + good["line"].astype(str)))
    unique = good.drop_duplicates(subset=["id"]).drop_duplicates(subset=["text"])
    clean = unique[NEWS_COLUMNS].astype({"id": "str", "text": "str"}).sort_values("id").reset_index(drop=True)
    counts.update(rows_in=len(raw), clean=len(clean), quarantined=len(bad), duplicates=len(good) - len(unique))
    if counts["rows_in"] != counts["clean"] + counts["quarantined"] + counts["duplicates"]:
        raise AssertionError(f"counts do not reconcile: {counts}")

    partition = news_partition(settings, day)
    quarantine = news_quarantine(settings, day)
    if len(clean):
        validate_corpus(clean, id_column="id").raise_for_failures()
    # Replace, never append: this day's output only.
    partition.mkdir(parents=True, exist_ok=True)
    for old in partition.iterdir():
        old.unlink()
    clean.to_parquet(partition / "news.parquet", index=False)
    quarantine.unlink(missing_ok=True)
    rejected_files = quarantine.with_suffix(".files.json")
    rejected_files.unlink(missing_ok=True)
    if len(bad):
        quarantine.parent.mkdir(parents=True, exist_ok=True)
        bad[["file", "line", "id", "text", "reason"]].astype({"text": "str", "id": "str"}).to_parquet(quarantine, index=False)
    if file_errors:
        rejected_files.parent.mkdir(parents=True, exist_ok=True)
        rejected_files.write_text(json.dumps(file_errors, indent=2))
        for error in file_errors:
            log.error("quarantined file %s: %s", error["file"], error["reason"])
    return {**counts, "status": "ingested", "partition": str(partition.resolve()),
            "quarantine": str(quarantine.resolve()) if len(bad) else None,
            "file_errors": file_errors}


def load_news(settings: Settings) -> pd.DataFrame:
    """Every ingested day, in order."""
    root = settings.data_dir / "curated" / "news"
    parts = sorted(root.glob("date=*/news.parquet"))
    if not parts:
        return pd.DataFrame(columns=[*NEWS_COLUMNS, "date"])
    return pd.concat([pd.read_parquet(p).assign(date=p.parent.name.removeprefix("date=")) for p in parts], ignore_index=True)

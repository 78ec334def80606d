"""Daily news partitions: ``landing/<day>/*`` → ``data/curated/news/date=<day>/``.

A day is processed on its own and replaces its own output, so re-running a
day, or backfilling a range, gives the same curated data as running each day
once. A day with no landing folder is a no-op."""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import IngestConfig, Settings
from pipeline.data.clean import CleanResult, require_clean_share, split_id_conflicts, text_problem
from pipeline.data.landing import day_files, news_partition
from pipeline.data.sources import normalize_text, normalize_value
from pipeline.data.tabular import STANDARD_COLUMNS, ColumnMapping, SourceError, read_table
from pipeline.data.tokens import content_tokens, load_tokenizer, token_counts
from pipeline.data.validate import truncated_share, validate_corpus

log = logging.getLogger(__name__)

NEWS_COLUMNS = ["id", "timestamp", "title", "text", "entities", "topics", "source"]
QUARANTINE_COLUMNS = ["file", "line", "id", "text", "reason"]
COUNTS_FILE = "_counts.json"


def news_quarantine(settings: Settings, day: date) -> Path:
    return settings.quarantine_dir / "news" / f"date={day.isoformat()}.parquet"


def _read_day(files: list[Path], mapping: ColumnMapping, cfg: IngestConfig) -> tuple[pd.DataFrame, list[dict]]:
    frames, file_errors = [], []
    for path in files:
        try:
            # A file that links out of its day folder is refused unread, as an unreadable one is.
            frames.append(read_table(str(path), mapping, cfg=cfg, root=path.parent))
        except SourceError as err:  # the file goes to quarantine whole; the day goes on
            file_errors.append({"file": str(path), "reason": str(err)})
            log.error("quarantined file %s: %s", path, err)
    raw = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STANDARD_COLUMNS)
    return raw, file_errors


_TAG_SEPARATORS = re.compile(r"[|;]")


def as_tags(value) -> list[str]:
    """An entity or topic cell as a list of distinct names: a list as it is, a
    string split at ``|`` or ``;``, nothing for a missing value."""
    if isinstance(value, str):
        items = _TAG_SEPARATORS.split(value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = [str(item) for item in value if item is not None]
    else:
        items = []
    return list(dict.fromkeys(name for item in items if (name := normalize_text(item))))


def _clean_day(raw: pd.DataFrame, max_chars: int) -> CleanResult:
    raw = raw.assign(
        text=raw["text"].map(normalize_value),
        title=raw["title"].map(lambda t: normalize_text(t) if isinstance(t, str) and t.strip() else None),
        entities=raw["entity"].map(as_tags), topics=raw["topics"].map(as_tags),
    )
    raw["reason"] = [text_problem(t, e, 1, max_chars) for t, e in zip(raw["text"], raw["error"])]
    bad = raw[raw["reason"].notna()]
    good = raw[raw["reason"].isna()]
    # Rows without an id get their place in the landing zone as one.
    good = good.assign(id=good["id"].where(good["id"].notna(), good["file"] + ":" + good["line"].astype(str)))
    good, id_conflicts = split_id_conflicts(good)
    unique = good.drop_duplicates(subset=["id"]).drop_duplicates(subset=["text"])
    quarantine = pd.concat([bad, id_conflicts])[QUARANTINE_COLUMNS].reset_index(drop=True)
    return CleanResult(
        clean=unique.astype({"id": "str", "text": "str"}).sort_values("id").reset_index(drop=True),
        quarantine=quarantine, duplicates=len(good) - len(unique), rows_in=len(raw),
    )


def news_mapping(cfg: IngestConfig) -> ColumnMapping:
    """Landing-file columns → the standard ones (``FINSENT_INGEST__*_COLUMN``)."""
    return ColumnMapping(text=cfg.text_column, id=cfg.id_column or "id", timestamp=cfg.timestamp_column,
                         title=cfg.title_column, entity=cfg.entity_column, topics=cfg.topics_column,
                         source=cfg.source_column)


def ingest_news_day(settings: Settings, day: date, mapping: ColumnMapping | None = None, tokenizer=None) -> dict:
    """Reads the day's landing files, cleans, validates and writes its
    partition with a ``_counts.json`` beside it (Parquet readers skip it)."""
    files = day_files(settings.landing_zone, day)
    summary = {"date": day.isoformat(), "files": len(files), "rows_in": 0, "clean": 0, "quarantined": 0, "duplicates": 0}
    if not files:
        log.info("no landing files for %s in %s: nothing to do", day, settings.landing_zone)
        return {**summary, "status": "no files"}

    raw, file_errors = _read_day(files, mapping or news_mapping(settings.ingest), settings.ingest)
    cleaned = _clean_day(raw, settings.ingest.max_news_chars)
    report = None
    if len(cleaned.clean):
        tokenizer = tokenizer or load_tokenizer(settings.train.base_model)
        frame = cleaned.clean.assign(n_tokens=token_counts(cleaned.clean["text"].tolist(), tokenizer))
        report = validate_corpus(frame, settings.ingest, id_column="id")
        cleaned = cleaned.with_row_failures(frame, report.row_failures)
        max_tokens = content_tokens(tokenizer, settings.train.max_length)
        summary["truncated_share"] = round(truncated_share(frame["n_tokens"], max_tokens), 4)
    summary.update(cleaned.reconcile(), files_quarantined=len(file_errors))

    quarantine = news_quarantine(settings, day)
    rejected_files = quarantine.with_suffix(".files.json")
    quarantine.unlink(missing_ok=True)
    rejected_files.unlink(missing_ok=True)
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    if len(cleaned.quarantine):
        cleaned.quarantine.astype({"text": "str", "id": "str"}).to_parquet(quarantine, index=False)
    if file_errors:
        rejected_files.write_text(json.dumps(file_errors, indent=2))
    require_clean_share(summary, settings.ingest.min_clean_share, quarantine)
    if report is not None:
        report.raise_for_failures()

    # Replace, never append: this day's output only. Each file is swapped in whole, so a reader (the
    # monitor scoring the next day of a backfill, which may curate this day at the same time) never sees half.
    partition = news_partition(settings, day)
    partition.mkdir(parents=True, exist_ok=True)
    for old in partition.iterdir():
        if old.name not in ("news.parquet", COUNTS_FILE) and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    staged = partition / f".news.parquet.{os.getpid()}"
    cleaned.clean[NEWS_COLUMNS].to_parquet(staged, index=False)
    staged.replace(partition / "news.parquet")
    staged = partition / f".{COUNTS_FILE}.{os.getpid()}"
    staged.write_text(json.dumps({**summary, "file_errors": len(file_errors)}, indent=2) + "\n")
    staged.replace(partition / COUNTS_FILE)
    return {**summary, "status": "ingested", "partition": str(partition.resolve()),
            "quarantine": str(quarantine.resolve()) if len(cleaned.quarantine) else None,
            "file_errors": file_errors}


COUNTED = ("files", "files_quarantined", "rows_in", "clean", "quarantined", "duplicates")


def news_report(settings: Settings, first: date, last: date) -> dict:
    """Counts of the ingested days in ``[first, last]`` summed from each
    partition's ``_counts.json``, checked to reconcile day by day and in total:
    what a data engineer reads after a backfill."""
    totals = dict.fromkeys(COUNTED, 0)
    ingested, without_partition = [], []
    day = first
    while day <= last:
        counts_file = news_partition(settings, day) / COUNTS_FILE
        if counts_file.is_file():
            counts = json.loads(counts_file.read_text())
            if counts["rows_in"] != counts["clean"] + counts["quarantined"] + counts["duplicates"]:
                raise AssertionError(f"{counts_file}: counts do not reconcile: {counts}")
            for key in COUNTED:
                totals[key] += counts.get(key, 0)
            ingested.append(day.isoformat())
        else:
            without_partition.append(day.isoformat())
        day += timedelta(days=1)
    if totals["rows_in"] != totals["clean"] + totals["quarantined"] + totals["duplicates"]:
        raise AssertionError(f"totals do not reconcile: {totals}")
    return {"from": first.isoformat(), "to": last.isoformat(), "days_ingested": len(ingested),
            "days_without_partition": without_partition, **totals, "reconciled": True}


def load_news(settings: Settings) -> pd.DataFrame:
    """Every ingested day, in order."""
    root = settings.data_dir / "curated" / "news"
    parts = sorted(root.glob("date=*/news.parquet"))
    if not parts:
        return pd.DataFrame(columns=[*NEWS_COLUMNS, "date"])
    return pd.concat([pd.read_parquet(p).assign(date=p.parent.name.removeprefix("date=")) for p in parts], ignore_index=True)

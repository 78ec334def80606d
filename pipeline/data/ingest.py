"""The ingest stage: read, clean, split, validate, write Parquet, version."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import date
from pathlib import Path

import pandas as pd

from pipeline.config import Settings
from pipeline.data.clean import clean_corpus, clean_labeled
from pipeline.data.frozen import compare_to_frozen
from pipeline.data.news import ingest_news_day
from pipeline.data.sources import read_labeled_source, read_phrasebank, read_phrasebank_hub, read_reuters
from pipeline.data.split import split_labeled
from pipeline.data.validate import DataValidationError, validate_corpus, validate_labeled
from pipeline.data.version import version_data

log = logging.getLogger(__name__)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def load_split(labeled_dir: Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(labeled_dir / f"{split}.parquet")


def ingest_labeled(settings: Settings) -> dict:
    """Labeled reference set and bulk corpus: read, clean, split, validate, write.
    Replaces its own outputs only (daily news partitions are left alone)."""
    if settings.labeled_source:
        cfg = settings.ingest
        raw, agreement = read_labeled_source(settings.labeled_source, cfg.text_column, cfg.label_column)
    elif settings.fpb_dir is not None and settings.fpb_dir.is_dir():
        raw, agreement = read_phrasebank(settings.fpb_dir)
    else:
        log.info("no Financial PhraseBank folder at %s; reading it from the hub", settings.fpb_dir)
        raw, agreement = read_phrasebank_hub()
    cleaned = clean_labeled(raw, agreement, settings.ingest)
    counts = cleaned.counts
    if counts["rows_in"] != counts["clean"] + counts["quarantined"] + counts["duplicates"]:
        raise AssertionError(f"counts do not reconcile: {counts}")
    clean_share = counts["clean"] / max(counts["rows_in"], 1)
    if clean_share < settings.ingest.min_clean_share:
        raise DataValidationError(
            f"only {clean_share:.1%} of {counts['rows_in']} rows are clean "
            f"(threshold {settings.ingest.min_clean_share:.0%}); see {settings.quarantine_dir}"
        )

    splits = split_labeled(cleaned.clean, settings.ingest)
    report = validate_labeled(splits, settings.ingest, settings.data_docs_dir)
    log.info("Great Expectations Data Docs: %s", report.docs_index)
    report.raise_for_failures()

    # Replace, never append: a re-run leaves exactly one copy of its output.
    shutil.rmtree(settings.labeled_dir, ignore_errors=True)
    for name, frame in splits.items():
        _write_parquet(frame, settings.labeled_dir / f"{name}.parquet")
    _write_parquet(cleaned.quarantine, settings.quarantine_dir / "labeled.parquet")

    frozen = compare_to_frozen(settings.project_dir, splits["test"])
    if frozen["changed"]:
        log.warning("the test split differs from the frozen one (%s): training will refuse until it is re-frozen",
                    frozen["frozen_digest"][:12])

    corpus_counts = None
    settings.corpus_path.unlink(missing_ok=True)
    if settings.reuters_dir is not None:
        corpus, corpus_counts = clean_corpus(read_reuters(settings.reuters_dir))
        validate_corpus(corpus, docs_dir=settings.data_docs_dir).raise_for_failures()
        _write_parquet(corpus, settings.corpus_path)

    return {
        **counts,
        "quarantine_dir": str(settings.quarantine_dir.resolve()),
        "labeled_dir": str(settings.labeled_dir.resolve()),
        "splits": {name: len(frame) for name, frame in splits.items()},
        "data_docs": report.docs_index,
        "test_digest": frozen["test_digest"],
        "test_changed": frozen["changed"],
        "corpus": corpus_counts,
        "corpus_path": str(settings.corpus_path.resolve()) if corpus_counts else None,
    }


def version_curated(settings: Settings) -> str:
    """``dvc add`` + ``dvc push`` of data/; returns the digest downstream runs log."""
    remote = settings.dvc_remote or str((settings.state_dir / "dvc-remote").resolve())
    return version_data(settings.project_dir, remote)


def ingest(settings: Settings, day: date | None = None) -> dict:
    """The whole stage from the shell: the labeled set, the day's news
    partition when ``day`` is given, then versioning."""
    summary = ingest_labeled(settings)
    if day is not None:
        summary["news"] = ingest_news_day(settings, day)
    summary["digest"] = version_curated(settings)
    log.info("ingest: %s", json.dumps(summary))
    return summary

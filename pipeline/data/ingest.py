"""The ingest stage: read, clean, split, validate, write Parquet, version."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import date
from pathlib import Path

import pandas as pd

from pipeline.config import Settings
from pipeline.data.clean import clean_corpus, clean_labeled, require_clean_share
from pipeline.data.frozen import compare_to_frozen
from pipeline.data.news import ingest_news_day
from pipeline.data.sources import read_labeled_source, read_phrasebank, read_phrasebank_hub, read_reuters
from pipeline.data.split import SPLITS, split_labeled
from pipeline.data.tokens import content_tokens, load_tokenizer, token_counts
from pipeline.data.validate import (
    LABELED_COLUMNS,
    labeled_frame,
    truncated_share,
    validate_corpus,
    validate_labeled,
)
from pipeline.data.version import version_data

log = logging.getLogger(__name__)
CORPUS_COLUMNS = ["doc_id", "date", "text", "source"]


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def load_split(labeled_dir: Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(labeled_dir / f"{split}.parquet")


def _read_labeled(settings: Settings) -> tuple[pd.DataFrame, dict[str, int]]:
    cfg = settings.ingest
    if settings.labeled_source:
        return read_labeled_source(settings.labeled_source, cfg.text_column, cfg.label_column, cfg.id_column, cfg)
    if settings.fpb_dir is not None and settings.fpb_dir.is_dir():
        return read_phrasebank(settings.fpb_dir)
    log.info("no Financial PhraseBank folder at %s; reading it from the hub", settings.fpb_dir)
    return read_phrasebank_hub()


def ingest_labeled(settings: Settings, tokenizer=None) -> dict:
    """Labeled reference set: read, clean, split, validate, write. Replaces
    its own outputs only (the corpus and daily news partitions are left alone)."""
    cfg = settings.ingest
    tokenizer = tokenizer or load_tokenizer(settings.train.base_model)
    max_tokens = content_tokens(tokenizer, settings.train.max_length)
    raw, agreement = _read_labeled(settings)
    cleaned = clean_labeled(raw, agreement, cfg)

    frame = labeled_frame(split_labeled(cleaned.clean, cfg))
    frame["n_tokens"] = token_counts(frame["text"].tolist(), tokenizer)
    report = validate_labeled(frame, cfg, max_tokens, settings.data_docs_dir)
    log.info("Great Expectations Data Docs: %s", report.docs_index)
    cleaned = cleaned.with_row_failures(frame, report.row_failures)
    counts = cleaned.reconcile()
    quarantine_path = settings.quarantine_dir / "labeled.parquet"
    _write_parquet(cleaned.quarantine.astype({"id": "str", "text": "str"}), quarantine_path)
    require_clean_share(counts, cfg.min_clean_share, quarantine_path)
    report.raise_for_failures()

    kept = cleaned.clean
    splits = {name: kept[kept["split"] == name][LABELED_COLUMNS].reset_index(drop=True) for name in SPLITS}
    # Replace, never append: a re-run leaves exactly one copy of its output.
    shutil.rmtree(settings.labeled_dir, ignore_errors=True)
    for name, split in splits.items():
        _write_parquet(split, settings.labeled_dir / f"{name}.parquet")

    frozen = compare_to_frozen(settings.project_dir, splits["test"])
    if frozen["changed"]:
        log.warning("the test split differs from the frozen one (%s): training will refuse until it is re-frozen",
                    frozen["frozen_digest"][:12])
    return {
        **counts,
        "quarantine_dir": str(settings.quarantine_dir.resolve()),
        "labeled_dir": str(settings.labeled_dir.resolve()),
        "splits": {name: len(split) for name, split in splits.items()},
        "tokens": {"max_tokens": max_tokens, "truncated_share": round(truncated_share(kept["n_tokens"], max_tokens), 4)},
        "data_docs": report.docs_index,
        "test_digest": frozen["test_digest"],
        "test_changed": frozen["changed"],
    }


def ingest_corpus(settings: Settings, tokenizer=None) -> dict | None:
    """The bulk unlabeled corpus for masked-LM adaptation, when a Reuters folder is configured."""
    settings.corpus_path.unlink(missing_ok=True)
    if settings.reuters_dir is None:
        return None
    cfg = settings.ingest
    tokenizer = tokenizer or load_tokenizer(settings.train.base_model)
    max_tokens = content_tokens(tokenizer, settings.train.max_length)
    cleaned = clean_corpus(read_reuters(settings.reuters_dir), cfg)
    frame = cleaned.clean.assign(n_tokens=token_counts(cleaned.clean["text"].tolist(), tokenizer))
    report = validate_corpus(frame, cfg, "doc_id", settings.data_docs_dir)
    cleaned = cleaned.with_row_failures(frame, report.row_failures, id_column="doc_id")
    counts = cleaned.reconcile()
    quarantine_path = settings.quarantine_dir / "corpus.parquet"
    _write_parquet(cleaned.quarantine.astype({"id": "str", "text": "str"}), quarantine_path)
    require_clean_share(counts, cfg.min_clean_share, quarantine_path)
    report.raise_for_failures()
    _write_parquet(cleaned.clean[CORPUS_COLUMNS], settings.corpus_path)
    return {**counts, "path": str(settings.corpus_path.resolve()),
            "tokens": {"max_tokens": max_tokens, "truncated_share": round(truncated_share(frame["n_tokens"], max_tokens), 4)}}


def version_curated(settings: Settings) -> str:
    """``dvc add`` + ``dvc push`` of data/; returns the digest downstream runs log.
    A failed push leaves ``data.dvc`` as it was and raises."""
    remote = settings.dvc_remote or str((settings.state_dir / "dvc-remote").resolve())
    return version_data(settings.project_dir, remote)


def ingest(settings: Settings, day: date | None = None) -> dict:
    """The whole stage from the shell: the labeled set, the day's news
    partition when ``day`` is given, then versioning."""
    tokenizer = load_tokenizer(settings.train.base_model)
    summary = ingest_labeled(settings, tokenizer)
    summary["corpus"] = ingest_corpus(settings, tokenizer)
    if day is not None:
        summary["news"] = ingest_news_day(settings, day)
    summary["digest"] = version_curated(settings)
    log.info("ingest: %s", json.dumps(summary))
    return summary

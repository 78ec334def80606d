"""Cleaning: every row ends up clean, quarantined with a reason, or counted
as a duplicate, and the three counts add up to the rows read."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import LABELS, IngestConfig
from pipeline.data.sources import normalize_value
from pipeline.data.validate import DataValidationError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
QUARANTINE_COLUMNS = ["source", "line", "id", "text", "label", "reason"]


def text_id(text: str) -> str:
    """A stable id for rows whose source has none: the sha256 of the normalised text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class CleanResult:
    clean: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates: int
    rows_in: int

    @property
    def counts(self) -> dict[str, int]:
        return {
            "rows_in": self.rows_in,
            "clean": len(self.clean),
            "quarantined": len(self.quarantine),
            "duplicates": self.duplicates,
        }

    def reconcile(self) -> dict[str, int]:
        """The counts, after checking that every row read is accounted for."""
        counts = self.counts
        if counts["rows_in"] != counts["clean"] + counts["quarantined"] + counts["duplicates"]:
            raise AssertionError(f"counts do not reconcile: {counts}")
        return counts

    def with_row_failures(self, frame: pd.DataFrame, failures: dict, id_column: str = "id") -> CleanResult:
        """``frame`` (this result's clean rows, possibly with extra columns) as
        the clean rows, minus those in ``failures`` (index → reason), which
        join the quarantine."""
        failed = frame.index.isin(list(failures))
        rejected = frame[failed]
        rejected = rejected.assign(id=rejected[id_column].astype(str), reason=[failures[i] for i in rejected.index])
        quarantine = pd.concat([self.quarantine, rejected.reindex(columns=self.quarantine.columns)], ignore_index=True)
        return CleanResult(clean=frame[~failed], quarantine=quarantine, duplicates=self.duplicates, rows_in=self.rows_in)


def text_problem(text, error, min_chars: int, max_chars: int) -> str | None:
    """The first reason a row's text cannot be used, or None. Missing values
    arrive as NaN (pandas' string columns), not only None."""
    if isinstance(error, str) and error:
        return error
    if not isinstance(text, str):
        return "missing text"
    if _CONTROL.search(text):
        return "control characters in text"
    if not text:
        return "empty text"
    if not min_chars <= len(text) <= max_chars:
        return f"text length {len(text)} outside [{min_chars}, {max_chars}]"
    return None


ID_CONFLICT = "id conflict: same id as a different text"


def split_id_conflicts(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``rows`` without, and with, an id that names more than one text. Which
    text such an id means cannot be told, so all of its rows are quarantined
    (not counted as duplicates); the same id with the same text stays a
    duplicate for deduplication. Rows without an id are never in conflict."""
    texts_per_id = rows.groupby("id", sort=False)["text"].transform("nunique")
    conflicting = texts_per_id.gt(1)
    return rows[~conflicting], rows[conflicting].assign(reason=ID_CONFLICT)


def _row_problem(text, label, error, cfg: IngestConfig) -> str | None:
    problem = text_problem(text, error, cfg.min_chars, cfg.max_chars)
    if problem is not None:
        return problem
    if not isinstance(label, str):
        return "missing label"
    if label not in LABELS:
        return f"unknown label {label!r}"
    return None


def clean_labeled(raw: pd.DataFrame, agreement: dict[str, int], cfg: IngestConfig) -> CleanResult:
    rows = raw.assign(text=raw["text"].map(normalize_value))
    rows["reason"] = [
        _row_problem(t, lbl, err, cfg) for t, lbl, err in zip(rows["text"], rows["label"], rows["error"])
    ]
    bad = rows[rows["reason"].notna()]
    good = rows[rows["reason"].isna()]

    labels_per_text = good.groupby("text")["label"].agg(lambda s: "/".join(sorted(set(s))))
    conflicting = labels_per_text[labels_per_text.str.contains("/")]
    in_conflict = good["text"].isin(conflicting.index)
    conflicts = good[in_conflict].assign(reason=lambda d: "conflicting labels: " + d["text"].map(conflicting))
    good = good[~in_conflict]

    deduplicated = good.drop_duplicates(subset=["text", "label"], keep="first")
    clean = deduplicated.assign(
        id=[str(i) if pd.notna(i) else text_id(t) for i, t in zip(deduplicated["id"], deduplicated["text"])],
        # Agreement comes from the source (Financial PhraseBank levels); a source without it
        # records no disagreement (100), so soft targets leave its labels hard.
        agreement=deduplicated["text"].map(agreement).fillna(50 if agreement else 100).astype("int64"),
    )
    quarantine = pd.concat([bad, conflicts])[QUARANTINE_COLUMNS]
    return CleanResult(
        clean=clean[["id", "text", "label", "agreement", "source", "line"]].reset_index(drop=True),
        quarantine=quarantine.reset_index(drop=True),
        duplicates=len(good) - len(deduplicated),
        rows_in=len(raw),
    )


def clean_corpus(raw: pd.DataFrame, cfg: IngestConfig) -> CleanResult:
    """The bulk unlabeled corpus (Reuters-21578 bodies): unusable texts to
    quarantine, repeated stories counted as duplicates, ordered by id."""
    rows = raw.assign(text=raw["text"].map(normalize_value))
    rows["reason"] = [text_problem(t, None, 1, cfg.max_news_chars) for t in rows["text"]]
    bad = rows[rows["reason"].notna()]
    good = rows[rows["reason"].isna()]
    unique = good.drop_duplicates(subset=["text"], keep="first").sort_values("doc_id").reset_index(drop=True)
    quarantine = bad.assign(line=None, id=bad["doc_id"].astype(str), label=None)[QUARANTINE_COLUMNS]
    return CleanResult(
        clean=unique[["doc_id", "date", "text", "source"]],
        quarantine=quarantine.reset_index(drop=True),
        duplicates=len(good) - len(unique),
        rows_in=len(raw),
    )


def require_clean_share(counts: dict[str, int], threshold: float, quarantine: Path) -> None:
    """Fails a batch whose distinct rows are too often bad. Duplicates are not
    bad rows (a news feed reprints stories): they count on neither side."""
    distinct = counts["rows_in"] - counts.get("duplicates", 0)
    clean_share = counts["clean"] / max(distinct, 1)
    if clean_share < threshold:
        raise DataValidationError(
            f"only {clean_share:.1%} of {distinct} distinct rows are clean (threshold {threshold:.0%}); "
            f"{counts['quarantined']} quarantined with reasons in {quarantine}"
        )

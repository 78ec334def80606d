"""Cleaning: every row ends up clean, quarantined with a reason, or counted
as a duplicate, and the three counts add up to the rows read."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from pipeline.config import LABELS, IngestConfig
from pipeline.data.sources import normalize_value

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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
    clean = deduplicated.assign(agreement=deduplicated["text"].map(agreement).fillna(50).astype("int64"))
    quarantine = pd.concat([bad, conflicts])[["source", "line", "text", "label", "reason"]]
    return CleanResult(
        clean=clean[["text", "label", "agreement"]].reset_index(drop=True),
        quarantine=quarantine.reset_index(drop=True),
        duplicates=len(good) - len(deduplicated),
        rows_in=len(raw),
    )


def clean_corpus(raw: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    texts = raw[raw["text"].str.len() > 0]
    unique = texts.drop_duplicates(subset=["text"], keep="first").sort_values("doc_id").reset_index(drop=True)
    unique = unique[["doc_id", "date", "text", "source"]]
    counts = {
        "rows_in": len(raw),
        "clean": len(unique),
        "empty": len(raw) - len(texts),
        "duplicates": len(texts) - len(unique),
    }
    return unique, counts

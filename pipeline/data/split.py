"""Deterministic train/validation/test splits.

``hash`` (the default): a sentence's split depends only on a stable hash of
its split key (Unicode-normalised, case-folded, punctuation-free text), so new
data never moves an old test sentence into train, and near-duplicates that
share a key share a split. Class balance holds in expectation.

``stratified``: scikit-learn's stratified split with a seed, the canonical
split of published Financial PhraseBank results (72/8/20, seed 0); adding
data reshuffles it."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import pandas as pd
from sklearn.model_selection import train_test_split

from pipeline.config import IngestConfig

SPLITS = ("train", "validation", "test")
_NOT_WORD = re.compile(r"[\W_]+")


def split_key(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _NOT_WORD.sub(" ", folded).strip()


def hash_split(text: str, cfg: IngestConfig) -> str:
    digest = hashlib.sha256(f"{cfg.seed}:{split_key(text)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < cfg.train_fraction:
        return "train"
    if position < cfg.train_fraction + cfg.validation_fraction:
        return "validation"
    return "test"


def _stratified(ordered: pd.DataFrame, cfg: IngestConfig) -> tuple[pd.DataFrame, ...]:
    rest, test = train_test_split(
        ordered, test_size=cfg.test_fraction, stratify=ordered["label"], random_state=cfg.seed
    )
    train, validation = train_test_split(
        rest,
        test_size=cfg.validation_fraction / (cfg.train_fraction + cfg.validation_fraction),
        stratify=rest["label"],
        random_state=cfg.seed,
    )
    return train, validation, test


def split_labeled(clean: pd.DataFrame, cfg: IngestConfig) -> dict[str, pd.DataFrame]:
    # Sorting first makes the split independent of the order rows arrived in.
    ordered = clean.sort_values(["text", "label"]).reset_index(drop=True)
    if cfg.split_method == "stratified":
        parts = _stratified(ordered, cfg)
    else:
        assigned = ordered["text"].map(lambda text: hash_split(text, cfg))
        parts = tuple(ordered[assigned == name] for name in SPLITS)
    return {name: frame.sort_values("text").reset_index(drop=True) for name, frame in zip(SPLITS, parts)}

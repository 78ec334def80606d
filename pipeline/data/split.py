"""Deterministic stratified train/validation/test split."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from pipeline.config import IngestConfig

SPLITS = ("train", "validation", "test")


def split_labeled(clean: pd.DataFrame, cfg: IngestConfig) -> dict[str, pd.DataFrame]:
    # Sorting first makes the split independent of the order rows arrived in.
    ordered = clean.sort_values(["text", "label"]).reset_index(drop=True)
    rest, test = train_test_split(
        ordered, test_size=cfg.test_fraction, stratify=ordered["label"], random_state=cfg.seed
    )
    train, validation = train_test_split(
        rest,
        test_size=cfg.validation_fraction / (cfg.train_fraction + cfg.validation_fraction),
        stratify=rest["label"],
        random_state=cfg.seed,
    )
    return {
        name: frame.sort_values("text").reset_index(drop=True)
        for name, frame in zip(SPLITS, (train, validation, test))
    }

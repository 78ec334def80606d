"""The daily index, overall and per entity and topic: story count, mean net
sentiment, label shares, a decayed average, and a z-score against the
trailing days that have stories (a feed has gaps: calendar days without
stories are not zeros). A day with fewer than ``min_stories`` is low
coverage: shown, never a baseline day, never alerted on."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd

from pipeline.config import MonitorConfig

OVERALL = "overall"
DIMENSIONS = {OVERALL: None, "entity": "entities", "topic": "topics"}
INDEX_COLUMNS = ["day", "dimension", "key", "stories", "net_mean", "positive_share", "negative_share", "neutral_share",
                 "confidence_mean", "decayed_net", "zscore", "baseline_days", "baseline_mean", "baseline_std",
                 "low_coverage", "model_version", "onnx_sha256"]


def day_aggregates(stories: pd.DataFrame, day: date, min_stories: int) -> pd.DataFrame:
    """Aggregates of the day's original (non-reprint) scored stories."""
    frames = []
    for dimension, column in DIMENSIONS.items():
        if column is None:
            rows = stories.assign(key="all")
        else:
            rows = stories[["id", column, "net_sentiment", "label", "confidence"]].explode(column)
            rows = rows[rows[column].notna()].rename(columns={column: "key"})
        if rows.empty:
            continue
        grouped = rows.groupby("key")
        frames.append(pd.DataFrame({
            "dimension": dimension,
            "stories": grouped.size(),
            "net_mean": grouped["net_sentiment"].mean(),
            "positive_share": grouped["label"].apply(lambda labels: (labels == "positive").mean()),
            "negative_share": grouped["label"].apply(lambda labels: (labels == "negative").mean()),
            "neutral_share": grouped["label"].apply(lambda labels: (labels == "neutral").mean()),
            "confidence_mean": grouped["confidence"].mean(),
        }).rename_axis("key").reset_index())
    if not frames:
        return pd.DataFrame(columns=INDEX_COLUMNS)
    today = pd.concat(frames, ignore_index=True).assign(day=day.isoformat())
    today["low_coverage"] = today["stories"] < min_stories
    return today


def with_baselines(today: pd.DataFrame, history: pd.DataFrame, day: date, cfg: MonitorConfig) -> pd.DataFrame:
    """Adds the decayed average and the z-score of each row of ``today``
    against ``history`` (earlier days' index rows)."""
    usable = history[~history["low_coverage"].astype(bool) & (history["day"] < day.isoformat())]
    baselines = {key: group.sort_values("day").tail(cfg.baseline_days)
                 for key, group in usable.groupby(["dimension", "key"])} if len(usable) else {}
    out = today.copy()
    for column in ("decayed_net", "zscore", "baseline_mean", "baseline_std"):
        out[column] = np.nan
    out["baseline_days"] = 0
    for position, row in enumerate(out.itertuples()):
        base = baselines.get((row.dimension, row.key))
        values = base["net_mean"].to_numpy(float) if base is not None else np.zeros(0)
        ages = ((pd.Timestamp(day) - pd.to_datetime(base["day"])).dt.days.to_numpy(float)
                if base is not None else np.zeros(0))
        if not row.low_coverage:
            values, ages = np.append(values, row.net_mean), np.append(ages, 0.0)
        if len(values):
            weights = 0.5 ** (ages / cfg.decay_halflife_days)
            out.iloc[position, out.columns.get_loc("decayed_net")] = float(np.average(values, weights=weights))
        n = 0 if base is None else len(base)
        out.iloc[position, out.columns.get_loc("baseline_days")] = n
        if n >= 2:
            mean, std = float(base["net_mean"].mean()), float(base["net_mean"].std(ddof=1))
            out.iloc[position, out.columns.get_loc("baseline_mean")] = mean
            out.iloc[position, out.columns.get_loc("baseline_std")] = std
            if n >= cfg.min_baseline_days and std > 0 and not row.low_coverage:
                out.iloc[position, out.columns.get_loc("zscore")] = (row.net_mean - mean) / std
    return out


def find_alerts(index: pd.DataFrame, cfg: MonitorConfig) -> pd.DataFrame:
    """Rows whose |z-score| reaches the threshold with enough stories."""
    hit = index["zscore"].abs().ge(cfg.alert_zscore) & index["stories"].ge(cfg.alert_min_stories) & ~index["low_coverage"]
    alerts = index[hit.fillna(False)].copy()
    alerts["threshold"] = cfg.alert_zscore
    alerts["direction"] = np.where(alerts["zscore"] > 0, "up", "down")
    return alerts.sort_values(["dimension", "key"]).reset_index(drop=True)

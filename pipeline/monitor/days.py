"""Whether the monitor has anything to do for a day, answered without the
scoring stack (ONNX Runtime, MLflow, Great Expectations): over a feed with
gaps most days of a backfill have no news, and each is a task of its own."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pipeline.config import Settings
from pipeline.data.landing import day_files, news_partition


def monitor_partition(settings: Settings, day: date) -> Path:
    return settings.monitor_dir / f"date={day.isoformat()}"


def has_work(settings: Settings, day: date) -> bool:
    """The day has curated stories or landing files to score, or outputs of an
    earlier run to clear. Every table row of a day is written with its
    partition, so a day without one has no rows."""
    return ((news_partition(settings, day) / "news.parquet").is_file() or bool(day_files(settings.landing_zone, day))
            or monitor_partition(settings, day).is_dir())

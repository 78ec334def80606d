"""The landing zone: raw files per day, ``<landing>/YYYY-MM-DD/*``, and
where each day's curated news goes."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from pipeline.config import Settings
from pipeline.data.sources import read_reuters
from pipeline.data.tabular import TABULAR_SUFFIXES


def news_partition(settings: Settings, day: date) -> Path:
    return settings.data_dir / "curated" / "news" / f"date={day.isoformat()}"


def day_folder(landing_dir: Path, day: date) -> Path:
    return landing_dir / day.isoformat()


def day_files(landing_dir: Path, day: date) -> list[Path]:
    """The day's input files in a stable order; none when the folder does not exist."""
    folder = day_folder(landing_dir, day)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TABULAR_SUFFIXES)


def layout_reuters(reuters_dir: Path, landing_dir: Path) -> dict[str, int]:
    """Writes each Reuters-21578 story into ``<landing>/<its DATE>/reuters.jsonl``
    (``id``, ``timestamp``, ``title``, ``text``, ``entities``, ``topics``,
    ``source``), so the news stream can be
    ingested and backfilled day by day. Rewrites the files: running it twice
    gives the same bytes."""
    stories = read_reuters(reuters_dir).dropna(subset=["date"]).sort_values(["date", "doc_id"])
    counts: dict[str, int] = {}
    for day, group in stories.groupby("date", sort=True):
        folder = landing_dir / day
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"id": f"reuters-{row.doc_id}", "timestamp": row.timestamp, "title": row.title, "text": row.text,
                        "entities": row.entities, "topics": row.topics, "source": row.source})
            for row in group.itertuples()
        ]
        (folder / "reuters.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[day] = len(lines)
    return counts

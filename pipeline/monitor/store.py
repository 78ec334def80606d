"""The monitor's SQL tables (SQLite by default; the scaled-out Postgres when
``FINSENT_MONITOR__DATABASE_URL`` says so). Writing a day replaces that day's
rows in one transaction: a re-run or a backfill never duplicates them."""

from __future__ import annotations

import math
from datetime import date

import pandas as pd
from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, create_engine, delete, func, select
from sqlalchemy.engine import Engine

metadata = MetaData()


def _day_table(name: str, *columns: Column) -> Table:
    return Table(name, metadata, Column("day", String(10), nullable=False, index=True), *columns)


TABLES: dict[str, Table] = {
    "index": _day_table(
        "monitor_index", Column("dimension", String(16), nullable=False), Column("key", String(256), nullable=False),
        Column("stories", Integer, nullable=False), Column("net_mean", Float), Column("positive_share", Float),
        Column("negative_share", Float), Column("neutral_share", Float), Column("confidence_mean", Float),
        Column("decayed_net", Float), Column("zscore", Float), Column("baseline_days", Integer),
        Column("low_coverage", Boolean, nullable=False), Column("model_version", String(32)),
        Column("onnx_sha256", String(64)),
    ),
    "alerts": _day_table(
        "monitor_alerts", Column("dimension", String(16), nullable=False), Column("key", String(256), nullable=False),
        Column("direction", String(8)), Column("net_mean", Float), Column("zscore", Float), Column("stories", Integer),
        Column("baseline_days", Integer), Column("threshold", Float), Column("model_version", String(32)),
        Column("onnx_sha256", String(64)),
    ),
    "drift": _day_table(
        "monitor_drift", Column("statistic", String(64), nullable=False), Column("value", Float),
        Column("threshold", Float), Column("drifted", Boolean), Column("window_texts", Integer),
        Column("model_version", String(32)), Column("onnx_sha256", String(64)),
    ),
    "shadow": _day_table(
        "monitor_shadow", Column("champion_version", String(32)), Column("candidate_version", String(32)),
        Column("texts", Integer), Column("agreement", Float), Column("story_agreement", Float),
    ),
}


def _plain(value):
    """A cell as the database driver takes it (NaN → NULL, numpy → Python)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


class MonitorStore:
    def __init__(self, url: str):
        # SQLite: wait for a writer of a parallel backfill instead of failing at once.
        connect_args = {"timeout": 60} if url.startswith("sqlite") else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args)
        metadata.create_all(self.engine)

    def replace_day(self, table: str, day: date, rows: pd.DataFrame) -> int:
        target = TABLES[table]
        names = [column.name for column in target.columns if column.name != "day"]
        records = [{"day": day.isoformat(), **{name: _plain(row.get(name)) for name in names}}
                   for row in rows.to_dict("records")]
        with self.engine.begin() as connection:
            connection.execute(delete(target).where(target.c.day == day.isoformat()))
            if records:
                connection.execute(target.insert(), records)
        return len(records)

    def read(self, table: str, first: date, last: date, **equal: str | None) -> pd.DataFrame:
        target = TABLES[table]
        query = select(target).where(target.c.day >= first.isoformat(), target.c.day <= last.isoformat())
        for column, value in equal.items():
            if value is not None:
                query = query.where(target.c[column] == value)
        with self.engine.connect() as connection:
            frame = pd.read_sql(query.order_by(*target.primary_key.columns, target.c.day), connection)
        return frame.sort_values("day", kind="stable").reset_index(drop=True)

    def baseline_rows(self, day: date, earliest: date, keys: pd.DataFrame, per_key: int) -> pd.DataFrame:
        """Index rows of ``keys`` (``dimension``, ``key``) from ``earliest`` up to the
        day before ``day`` that are not low coverage: the last ``per_key`` of each.
        One query, however long the history: a backfill reads no partition twice."""
        target = TABLES["index"]
        rank = func.row_number().over(partition_by=(target.c.dimension, target.c.key), order_by=target.c.day.desc())
        ranked = select(target.c.day, target.c.dimension, target.c.key, target.c.net_mean, target.c.low_coverage,
                        rank.label("rank")).where(
            target.c.day >= earliest.isoformat(), target.c.day < day.isoformat(), target.c.low_coverage.is_(False),
            target.c.dimension.in_(keys["dimension"].unique().tolist()), target.c.key.in_(keys["key"].unique().tolist()),
        ).subquery()
        with self.engine.connect() as connection:
            frame = pd.read_sql(select(ranked).where(ranked.c.rank <= per_key), connection)
        wanted = frame.merge(keys[["dimension", "key"]].drop_duplicates(), on=["dimension", "key"])
        return wanted.drop(columns="rank").sort_values(["dimension", "key", "day"]).reset_index(drop=True)

    def close(self) -> None:
        self.engine.dispose()


def render_rows(frame: pd.DataFrame, fmt: str, columns: list[str]) -> str:
    """Rows for a terminal (``table``), a spreadsheet (``csv``) or a program (``json``)."""
    frame = frame[[c for c in columns if c in frame]]
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return frame.to_json(orient="records")
    if frame.empty:
        return "(no rows)"
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


INDEX_VIEW = ["day", "dimension", "key", "stories", "net_mean", "positive_share", "negative_share", "decayed_net",
              "zscore", "baseline_days", "low_coverage", "model_version"]
ALERTS_VIEW = ["day", "dimension", "key", "direction", "net_mean", "zscore", "stories", "baseline_days", "model_version"]

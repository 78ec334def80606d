"""CSV, JSONL and Parquet files (local paths or fsspec URLs) read into the
standard columns through a configurable column mapping. A problem with one
row is recorded on that row; a problem with the whole file (missing column,
unreadable file) raises ``SourceError`` naming the file."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import pandas as pd

STANDARD_COLUMNS = ["id", "timestamp", "text", "label", "entity", "source", "file", "line", "error"]
TABULAR_SUFFIXES = (".csv", ".jsonl", ".parquet")


class SourceError(ValueError):
    """A whole input file cannot be used; the message names the file."""


@dataclass(frozen=True)
class ColumnMapping:
    text: str = "text"
    label: str | None = None
    id: str | None = None
    timestamp: str | None = None
    entity: str | None = None
    source: str | None = None

    def fields(self) -> dict[str, str]:
        """standard column → column in the file, for the mapped ones."""
        return {name: column for name, column in vars(self).items() if column}


def _open_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as handle:
        return handle.read()


def _decode_lines(data: bytes, encoding: str) -> list[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line; a line that is not valid in the
    declared encoding keeps its number and gets an error instead of text."""
    out = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            out.append((number, raw.decode(encoding), None))
        except UnicodeDecodeError as err:
            out.append((number, None, f"bytes not valid {encoding} at column {err.start + 1}"))
    return out


def _rows_from_records(records: list[tuple[int, dict | None, str | None]], mapping: ColumnMapping, url: str) -> pd.DataFrame:
    fields = mapping.fields()
    seen_columns: set[str] = set()
    rows = []
    for number, record, error in records:
        row = {name: None for name in STANDARD_COLUMNS}
        row.update(file=url, line=number, error=error)
        if record is not None:
            seen_columns.update(record)
            for name, column in fields.items():
                value = record.get(column)
                row[name] = None if value is None else value
            text = row["text"]
            if text is not None and not isinstance(text, str):
                row["error"] = f"{mapping.text!r} is {type(text).__name__}, not a string"
                row["text"] = str(text)
        rows.append(row)
    if records and seen_columns and mapping.text not in seen_columns:
        raise SourceError(f"{url}: no column {mapping.text!r} (columns: {sorted(seen_columns)})")
    if mapping.label and records and seen_columns and mapping.label not in seen_columns:
        raise SourceError(f"{url}: no column {mapping.label!r} (columns: {sorted(seen_columns)})")
    return pd.DataFrame(rows, columns=STANDARD_COLUMNS)


def _read_jsonl(url: str, mapping: ColumnMapping, encoding: str) -> pd.DataFrame:
    records = []
    for number, line, error in _decode_lines(_open_bytes(url), encoding):
        if error is not None:
            records.append((number, None, error))
        elif not line.strip():
            continue
        else:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                records.append((number, None, f"invalid JSON: {err.msg}"))
                continue
            if isinstance(value, dict):
                records.append((number, value, None))
            else:
                records.append((number, None, f"a JSON {type(value).__name__}, not an object"))
    return _rows_from_records(records, mapping, url)


def _read_csv(url: str, mapping: ColumnMapping, encoding: str) -> pd.DataFrame:
    decoded = _decode_lines(_open_bytes(url), encoding)
    if not decoded:
        return pd.DataFrame(columns=STANDARD_COLUMNS)
    header = decoded[0][1]
    if header is None:
        raise SourceError(f"{url}: the header line is not valid {encoding}")
    columns = next(csv.reader([header]))
    records = []
    for number, line, error in decoded[1:]:
        if error is not None:
            records.append((number, None, error))
            continue
        if not line.strip():
            continue
        values = next(csv.reader(io.StringIO(line)), [])
        if len(values) != len(columns):
            records.append((number, None, f"{len(values)} fields, the header has {len(columns)}"))
            continue
        records.append((number, dict(zip(columns, values)), None))
    if mapping.text not in columns or (mapping.label and mapping.label not in columns):
        missing = [c for c in (mapping.text, mapping.label) if c and c not in columns]
        raise SourceError(f"{url}: no column {missing[0]!r} (columns: {columns})")
    return _rows_from_records(records, mapping, url)


def _read_parquet(url: str, mapping: ColumnMapping) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(_open_bytes(url)))
    except Exception as err:
        raise SourceError(f"{url}: unreadable Parquet ({type(err).__name__}: {err})") from err
    columns = table.column_names
    missing = [c for c in (mapping.text, mapping.label) if c and c not in columns]
    if missing:
        raise SourceError(f"{url}: no column {missing[0]!r} (columns: {columns})")
    records = [(i, record, None) for i, record in enumerate(table.to_pylist(), start=1)]
    return _rows_from_records(records, mapping, url)


def read_table(url: str, mapping: ColumnMapping, encoding: str = "utf-8") -> pd.DataFrame:
    """One CSV / JSONL / Parquet file as standard columns."""
    lowered = url.lower()
    if lowered.endswith(".jsonl"):
        return _read_jsonl(url, mapping, encoding)
    if lowered.endswith(".csv"):
        return _read_csv(url, mapping, encoding)
    if lowered.endswith(".parquet"):
        return _read_parquet(url, mapping)
    raise SourceError(f"{url}: unknown file type (expected one of {', '.join(TABULAR_SUFFIXES)})")

"""CSV, JSONL and Parquet files (local paths or fsspec URLs) read into the
standard columns through a configurable column mapping. A problem with one
row is recorded on that row; a problem with the whole file (missing column,
unreadable file, a protocol the settings do not allow, a link out of its
folder) raises ``SourceError`` naming the file."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import IngestConfig

STANDARD_COLUMNS = ["id", "timestamp", "title", "text", "label", "entity", "topics", "source", "file", "line", "error"]
TABULAR_SUFFIXES = (".csv", ".jsonl", ".parquet")


class SourceError(ValueError):
    """A whole input file cannot be used; the message names the file."""


@dataclass(frozen=True)
class ColumnMapping:
    text: str = "text"
    label: str | None = None
    id: str | None = None
    timestamp: str | None = None
    title: str | None = None
    entity: str | None = None
    topics: str | None = None
    source: str | None = None

    def fields(self) -> dict[str, str]:
        """standard column → column in the file, for the mapped ones."""
        return {name: column for name, column in vars(self).items() if column}


_EXTRAS = {"s3": "s3", "s3a": "s3"}  # URL protocol → the finsent extra that installs its filesystem
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_BARE_PROTOCOL = re.compile(r"[a-z]+")


def url_protocols(url: str) -> list[str]:
    """Every protocol fsspec would open ``url`` through, lower-cased: none for
    a plain path, two for a chain such as ``simplecache::s3://b/x.csv``."""
    from fsspec.core import split_protocol

    pieces = url.split("::")
    protocols = []
    for piece in pieces:
        protocol, _ = split_protocol(piece)
        if protocol is None and len(pieces) > 1 and _BARE_PROTOCOL.fullmatch(piece):
            protocol = piece  # fsspec reads a bare word in a chain as a protocol name
        if protocol is not None:
            protocols.append(protocol.lower())
    return protocols


def check_protocols(url: str, allowed: list[str]) -> None:
    """Refuses, before anything is opened, a URL whose protocols are neither
    local files nor listed in ``FINSENT_INGEST__SOURCE_PROTOCOLS``."""
    permitted = _LOCAL_PROTOCOLS | {protocol.lower() for protocol in allowed}
    for protocol in url_protocols(url):
        if protocol not in permitted:
            raise SourceError(
                f"{url}: protocol {protocol!r} is not allowed for sources (allowed: local files"
                f"{''.join(', ' + p for p in allowed)}); add it to FINSENT_INGEST__SOURCE_PROTOCOLS to read it")


def check_inside(path: Path, root: Path) -> None:
    """Refuses a file that resolves (through links) outside ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise SourceError(f"{path}: a link to {resolved}, outside the source folder {root}; not read")


def _open_bytes(url: str) -> bytes:
    import fsspec

    try:
        opened = fsspec.open(url, "rb")
    except ImportError as err:
        extra = _EXTRAS.get(url.split("://", 1)[0].lower()) if "://" in url else None
        if extra is None:
            raise
        raise ImportError(f"{url}: {err} (pip install 'finsent[{extra}]')") from err
    with opened as handle:
        return handle.read()


def _too_large(size: int, max_bytes: int) -> str | None:
    if size > max_bytes:
        return f"{size} bytes, over the {max_bytes}-byte limit (FINSENT_INGEST__MAX_LINE_BYTES)"
    return None


def _decode_lines(data: bytes, encoding: str, max_bytes: int) -> list[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line; a line that is not valid in the
    declared encoding, or too large, keeps its number and gets an error instead of text."""
    out = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if error := _too_large(len(raw), max_bytes):
            out.append((number, None, error))
            continue
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


_JSON_TOKEN = re.compile(r'\\.|["\[\]{}]', re.S)  # an escape pair, a quote or a bracket


def _nested_deeper(line: str, max_depth: int) -> bool:
    """Whether ``line``'s arrays/objects (outside strings) nest deeper than
    ``max_depth``. json.loads recurses once per level and a deep enough line
    ends in RecursionError; scanning first makes the limit a setting and keeps
    the parser off such lines. Only lines with that many brackets are scanned."""
    if line.count("[") + line.count("{") <= max_depth:
        return False
    depth, in_string = 0, False
    for token in _JSON_TOKEN.finditer(line):
        char = token.group()
        if char == '"':
            in_string = not in_string
        elif in_string or len(char) == 2:
            continue
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _read_jsonl(url: str, mapping: ColumnMapping, encoding: str, cfg: IngestConfig) -> pd.DataFrame:
    records = []
    for number, line, error in _decode_lines(_open_bytes(url), encoding, cfg.max_line_bytes):
        if error is not None:
            records.append((number, None, error))
        elif not line.strip():
            continue
        elif _nested_deeper(line, cfg.max_json_depth):
            records.append((number, None, f"JSON nested deeper than {cfg.max_json_depth} levels "
                                          "(FINSENT_INGEST__MAX_JSON_DEPTH)"))
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


class _Lines:
    """Physical lines fed to ``csv.reader`` one at a time (it never reads
    ahead), so the lines each record was parsed from can be taken after it."""

    def __init__(self, text: str) -> None:
        self._source = io.StringIO(text, newline="")
        self._taken: list[str] = []
        self.ended = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._source.readline()
        if not line:
            self.ended = True
            raise StopIteration
        self._taken.append(line)
        return line

    def take(self) -> list[str]:
        taken, self._taken = self._taken, []
        return taken


_CsvRecord = tuple[int, list[str] | None, list[str], str | None]


def _csv_records(text: str) -> Iterator[_CsvRecord]:
    """(start line, fields, physical lines, error) per CSV record; a quoted
    field may span lines. A record the parser rejects gets an error and
    parsing goes on with the next line."""
    lines = _Lines(text)
    reader = csv.reader(lines, strict=True)
    start = 1
    while True:
        try:
            values, error = next(reader), None
        except StopIteration:
            return
        except csv.Error as err:
            values = None
            if lines.ended:  # end of data inside an open quote
                error = f"unterminated quoted field starting at line {start} (truncated file?)"
            else:
                error = f"malformed CSV: {err}"
        raw = lines.take()
        yield start, values, raw, error
        start += len(raw)


_ESCAPED = re.compile(r"[\ud800-\udfff]")


def _bad_bytes(raw: list[str], start: int, encoding: str) -> str | None:
    """Where the first byte not valid in the encoding is (decoded with
    surrogateescape, it is a lone surrogate), or None."""
    for offset, line in enumerate(raw):
        found = _ESCAPED.search(line)
        if found:
            column = len(line[: found.start()].encode(encoding)) + 1
            where = f"column {column}" if offset == 0 else f"line {start + offset}, column {column}"
            return f"bytes not valid {encoding} at {where}"
    return None


def _decode_escaped(data: bytes, encoding: str, url: str) -> str:
    try:
        return data.decode(encoding, errors="surrogateescape")
    except UnicodeDecodeError as err:  # only bytes >= 0x80 can be escaped (e.g. odd UTF-16)
        raise SourceError(f"{url}: not valid {encoding} at byte {err.start}: {err.reason}") from err


def _read_csv(url: str, mapping: ColumnMapping, encoding: str, max_bytes: int) -> pd.DataFrame:
    records = _csv_records(_decode_escaped(_open_bytes(url), encoding, url))
    header = next(records, None)
    if header is None:
        return pd.DataFrame(columns=STANDARD_COLUMNS)
    _, columns, raw, error = header
    if error is not None:
        raise SourceError(f"{url}: unreadable header: {error}")
    if _bad_bytes(raw, 1, encoding):
        raise SourceError(f"{url}: the header line is not valid {encoding}")
    rows = []
    for start, values, raw, error in records:
        if error is None and not "".join(raw).strip():
            continue
        size = sum(len(line.encode(encoding, errors="surrogateescape")) for line in raw)
        error = error or _too_large(size, max_bytes) or _bad_bytes(raw, start, encoding)
        if error is None and len(values) != len(columns):
            error = f"{len(values)} fields, the header has {len(columns)}"
        rows.append((start, None if error else dict(zip(columns, values)), error))
    if mapping.text not in columns or (mapping.label and mapping.label not in columns):
        missing = [c for c in (mapping.text, mapping.label) if c and c not in columns]
        raise SourceError(f"{url}: no column {missing[0]!r} (columns: {columns})")
    return _rows_from_records(rows, mapping, url)


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


def read_table(url: str, mapping: ColumnMapping, encoding: str = "utf-8", *,
               cfg: IngestConfig | None = None, root: Path | None = None) -> pd.DataFrame:
    """One CSV / JSONL / Parquet file as standard columns. ``cfg`` gives the
    allowed protocols and line limits (default: the defaults); a local file
    read from a folder source names that folder as ``root``."""
    cfg = cfg or IngestConfig()
    check_protocols(url, cfg.source_protocols)
    if root is not None and not url_protocols(url):
        check_inside(Path(url), root)
    lowered = url.lower()
    if lowered.endswith(".jsonl"):
        return _read_jsonl(url, mapping, encoding, cfg)
    if lowered.endswith(".csv"):
        return _read_csv(url, mapping, encoding, cfg.max_line_bytes)
    if lowered.endswith(".parquet"):
        return _read_parquet(url, mapping)
    raise SourceError(f"{url}: unknown file type (expected one of {', '.join(TABULAR_SUFFIXES)})")

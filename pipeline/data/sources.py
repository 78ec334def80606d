"""Readers for the labeled sentiment data and the unlabeled news corpus."""

from __future__ import annotations

import html
import re
import unicodedata
from datetime import datetime
from pathlib import Path

import pandas as pd

from pipeline.config import IngestConfig


# Agreement files are nested (AllAgree ⊂ 75 ⊂ 66 ⊂ 50): 50Agree holds every
# sentence; the others only tell each sentence's highest agreement level.
PHRASEBANK_LEVELS: dict[int, str] = {
    50: "Sentences_50Agree.txt",
    66: "Sentences_66Agree.txt",
    75: "Sentences_75Agree.txt",
    100: "Sentences_AllAgree.txt",
}
HUB_PHRASEBANK = "takala/financial_phrasebank"
HUB_CONFIGS: dict[int, str] = {50: "sentences_50agree", 66: "sentences_66agree", 75: "sentences_75agree", 100: "sentences_allagree"}

RAW_COLUMNS = ["id", "text", "label", "source", "line", "error"]


def _read_lines(path: Path) -> list[str]:
    # latin-1 maps every byte, so decoding never fails; CRLF is stripped per line.
    return path.read_bytes().decode("latin-1").splitlines()


def parse_phrasebank_line(line: str) -> tuple[str, str]:
    """``sentence@label`` → (sentence, label); raises ValueError with the reason."""
    if "@" not in line:
        raise ValueError("no '@' separator")
    text, label = line.rsplit("@", 1)
    return text, label.strip()


def _parsed_rows(lines: list[str], source: str) -> list[dict]:
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            text, label = parse_phrasebank_line(line)
            rows.append({"text": text, "label": label, "source": source, "line": number, "error": None})
        except ValueError as err:
            rows.append({"text": line, "label": None, "source": source, "line": number, "error": str(err)})
    return rows


def read_phrasebank(fpb_dir: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of 50Agree (unparseable lines carry their ``error``) and each
    normalised sentence's highest agreement level."""
    path50 = fpb_dir / PHRASEBANK_LEVELS[50]
    if not path50.is_file():
        raise FileNotFoundError(f"Financial PhraseBank file not found: {path50}")
    raw = pd.DataFrame(_parsed_rows(_read_lines(path50), path50.name), columns=RAW_COLUMNS)
    agreement: dict[str, int] = {}
    for level, name in sorted(PHRASEBANK_LEVELS.items()):
        path = fpb_dir / name
        if path.is_file():
            for row in _parsed_rows(_read_lines(path), name):
                if row["error"] is None:
                    agreement[normalize_text(row["text"])] = level
    return raw, agreement


HUB_LABEL_NAMES = ["negative", "neutral", "positive"]  # ClassLabel order of the hub dataset


def _load_hub_config(dataset_id: str, config: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, config, split="train")
    except Exception as err:  # datasets >= 4 refuses script-based repos such as this one
        try:
            # The hub's Parquet conversion of the same data, one folder per config.
            return datasets.load_dataset(dataset_id, data_dir=config, revision="refs/convert/parquet", split="train")
        except Exception:
            raise RuntimeError(f"could not load {dataset_id!r} ({config}) from the hub: {err}") from err


def read_phrasebank_hub(dataset_id: str = HUB_PHRASEBANK, load=_load_hub_config) -> tuple[pd.DataFrame, dict[str, int]]:
    """The same data through ``datasets``, for users with a hub."""
    agreement: dict[str, int] = {}
    raw = pd.DataFrame(columns=RAW_COLUMNS)
    for level, config in sorted(HUB_CONFIGS.items()):
        ds = load(dataset_id, config)
        feature = ds.features["label"]
        names = getattr(feature, "names", None) or HUB_LABEL_NAMES
        if level == 50:
            raw = pd.DataFrame({
                "text": ds["sentence"], "label": [names[i] for i in ds["label"]],
                "source": f"{dataset_id}/{config}", "line": range(1, len(ds) + 1), "error": None,
            }).reindex(columns=RAW_COLUMNS)
        for text in ds["sentence"]:
            agreement[normalize_text(text)] = level
    return raw, agreement


def _read_hub_table(dataset_id: str, text_column: str, label_column: str, id_column: str | None) -> pd.DataFrame:
    import datasets

    ds = datasets.load_dataset(dataset_id, split="train")
    names = getattr(ds.features.get(label_column), "names", None)
    labels = [names[i] for i in ds[label_column]] if names else [str(v) for v in ds[label_column]]
    return pd.DataFrame({
        "id": ds[id_column] if id_column else None, "text": ds[text_column], "label": labels,
        "source": dataset_id, "line": range(1, len(ds) + 1), "error": None,
    }).reindex(columns=RAW_COLUMNS)


def read_labeled_source(
    uri: str, text_column: str = "text", label_column: str = "label", id_column: str | None = None,
    cfg: IngestConfig | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Labeled rows from any supported source, chosen by the URI: a Financial
    PhraseBank folder, ``hf://<dataset id>``, or CSV/JSONL/Parquet files (one
    file, a folder of them, or an fsspec URL such as ``s3://…`` with the s3
    extra; ``cfg.source_protocols`` lists the protocols allowed). A folder's
    files must not link outside it. Returns raw rows and, for Financial
    PhraseBank, agreement levels."""
    from pipeline.data.tabular import TABULAR_SUFFIXES, ColumnMapping, SourceError, check_protocols, read_table

    if uri.startswith("hf://"):
        dataset_id = uri.removeprefix("hf://")
        if dataset_id == HUB_PHRASEBANK:
            return read_phrasebank_hub(dataset_id)
        return _read_hub_table(dataset_id, text_column, label_column, id_column), {}
    cfg = cfg or IngestConfig()
    check_protocols(uri, cfg.source_protocols)
    local = Path(uri)
    root = None
    if "://" not in uri and local.is_dir():
        if (local / PHRASEBANK_LEVELS[50]).is_file():
            return read_phrasebank(local)
        urls = [str(p) for p in sorted(local.iterdir()) if p.suffix.lower() in TABULAR_SUFFIXES]
        if not urls:
            raise SourceError(f"{uri}: neither Financial PhraseBank files nor CSV/JSONL/Parquet files")
        root = local
    elif "://" not in uri and not local.exists():
        raise SourceError(f"{uri}: no such file or folder")
    else:
        urls = [uri]
    mapping = ColumnMapping(text=text_column, label=label_column, id=id_column)
    frames = [read_table(url, mapping, cfg=cfg, root=root) for url in urls]
    table = pd.concat(frames, ignore_index=True)
    raw = table.assign(source=table["file"].map(lambda f: f.rsplit("/", 1)[-1]))
    return raw[RAW_COLUMNS].reset_index(drop=True), {}


_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC Unicode normalisation and collapsed whitespace."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


# A sentence ends at . ! or ? before a capital, but not after an initial or a "U.S."-style abbreviation.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[A-Z]\.)(?<![A-Z]\.[A-Z]\.)\s+(?=[A-Z\"'(])")


def split_sentences(text: str) -> list[str]:
    """The non-blank sentences of ``text``, whitespace collapsed."""
    return [sentence for piece in _SENTENCE_END.split(text) if (sentence := " ".join(piece.split()))]


def normalize_value(value):
    """normalize_text for strings; anything else (None, NaN, a number) as it is, for cleaning to judge."""
    return normalize_text(value) if isinstance(value, str) else value


_REUTERS_DOC = re.compile(r"<REUTERS\b([^>]*)>(.*?)</REUTERS>", re.S)
_NEWID = re.compile(r'NEWID="(\d+)"')
_DATE = re.compile(r"<DATE>\s*([^<]+?)\s*</DATE>")
_BODY = re.compile(r"<BODY>(.*?)</BODY>", re.S)
_TITLE = re.compile(r"<TITLE>(.*?)</TITLE>", re.S)
_D = re.compile(r"<D>(.*?)</D>", re.S)
# The story's tags: TOPICS are its subjects, the rest name who and where it is about.
REUTERS_TOPIC_TAGS = ("TOPICS",)
REUTERS_ENTITY_TAGS = ("PLACES", "ORGS", "EXCHANGES", "COMPANIES")
_CONTROL_ENTITY = re.compile(r"&#\d+;")
_TRAILER = re.compile(r"\s*Reuter\s*$")


def parse_reuters_date(raw: str) -> str:
    return datetime.strptime(raw.split()[0], "%d-%b-%Y").date().isoformat()


def parse_reuters_timestamp(raw: str) -> str | None:
    """``26-FEB-1987 15:01:01.79`` → ``1987-02-26T15:01:01``; None where the
    clock is garbled in the original (e.g. ``31-MAR-1987 605:12:19.00``)."""
    day, _, clock = raw.partition(" ")
    try:
        return datetime.strptime(f"{day} {clock.split('.')[0]}", "%d-%b-%Y %H:%M:%S").isoformat()
    except ValueError:
        return None


def _clean_sgml(text: str) -> str:
    return normalize_text(html.unescape(_CONTROL_ENTITY.sub("", text)))


def _tags(doc: str, names: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for name in names:
        block = re.search(rf"<{name}>(.*?)</{name}>", doc, re.S)
        if block:
            found += [tag for raw in _D.findall(block.group(1)) if (tag := _clean_sgml(raw)) and tag not in found]
    return found


def read_reuters(reuters_dir: Path) -> pd.DataFrame:
    """The Reuters-21578 stories that have a body: id, date, body text, title,
    and their tags as ``topics`` (``<TOPICS>``) and ``entities`` (``<PLACES>``,
    ``<ORGS>``, ``<EXCHANGES>``, ``<COMPANIES>``)."""
    files = sorted(reuters_dir.glob("reut2-*.sgm"))
    if not files:
        raise FileNotFoundError(f"no reut2-*.sgm files in {reuters_dir}")
    records = []
    for path in files:
        sgml = path.read_bytes().decode("latin-1")
        for attrs, doc in _REUTERS_DOC.findall(sgml):
            body = _BODY.search(doc)
            if body is None:
                continue
            text = _CONTROL_ENTITY.sub("", body.group(1))
            text = html.unescape(_TRAILER.sub("", text))
            date = _DATE.search(doc)
            title = _TITLE.search(doc)
            records.append({
                "doc_id": int(_NEWID.search(attrs).group(1)),
                "date": parse_reuters_date(date.group(1)) if date else None,
                "timestamp": parse_reuters_timestamp(date.group(1)) if date else None,
                "title": _clean_sgml(title.group(1)) if title else None,
                "text": normalize_text(text),
                "topics": _tags(doc, REUTERS_TOPIC_TAGS),
                "entities": _tags(doc, REUTERS_ENTITY_TAGS),
                "source": path.name,
            })
    return pd.DataFrame(records, columns=["doc_id", "date", "timestamp", "title", "text", "topics", "entities", "source"])

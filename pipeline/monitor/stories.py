"""A day's curated stories, and the texts scored for each: its title and its
body's sentences, a sentence longer than the model's window cut into windows
at word boundaries (never dropped)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer

from pipeline.config import Settings
from pipeline.data.news import as_tags, news_partition
from pipeline.data.sources import split_sentences
from pipeline.monitor import MonitorError

UNIT_COLUMNS = ["story_id", "text", "is_title", "split"]


def read_parquet_partition(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise MonitorError(f"corrupt Parquet partition {path}: {type(err).__name__}: {err}") from err


def load_day_stories(settings: Settings, day: date) -> pd.DataFrame | None:
    """The day's curated stories (None when the day has no partition), with
    ``title``, ``entities`` and ``topics`` even where older partitions lack them."""
    path = news_partition(settings, day) / "news.parquet"
    if not path.is_file():
        return None
    stories = read_parquet_partition(path)
    if "title" not in stories:
        stories["title"] = None
    stories["title"] = stories["title"].where(stories["title"].notna(), None)
    for column in ("entities", "topics"):
        stories[column] = stories[column].map(as_tags) if column in stories else [[] for _ in range(len(stories))]
    for column in ("timestamp", "source"):
        if column not in stories:
            stories[column] = None
    return stories.reset_index(drop=True)


def plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy that neither truncates nor pads: to count a text's tokens."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def _windows(text: str, encoding, max_tokens: int) -> list[str]:
    """Cuts at the last word start that keeps each window within ``max_tokens``."""
    offsets, words = encoding.offsets, encoding.word_ids
    pieces, start = [], 0
    while start < len(offsets):
        end = min(start + max_tokens, len(offsets))
        if end < len(offsets):
            cut = end
            while cut > start + 1 and words[cut] is not None and words[cut] == words[cut - 1]:
                cut -= 1
            end = cut if cut > start + 1 else end
        piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
        if piece:
            pieces.append(piece)
        start = end
    return pieces


def story_units(stories: pd.DataFrame, tokenizer: Tokenizer, max_tokens: int) -> pd.DataFrame:
    """One row per scored text: the title, then each sentence of the body;
    ``split`` marks the windows of a sentence longer than ``max_tokens``."""
    texts: list[tuple[str, str, bool]] = []
    for story in stories.itertuples():
        if story.title:
            texts.append((story.id, story.title, True))
        texts += [(story.id, sentence, False) for sentence in split_sentences(story.text)]
    if not texts:
        return pd.DataFrame(columns=UNIT_COLUMNS)
    encodings = tokenizer.encode_batch([text for _, text, _ in texts], add_special_tokens=False)
    rows = []
    for (story_id, text, is_title), encoding in zip(texts, encodings):
        if len(encoding.ids) <= max_tokens:
            rows.append((story_id, text, is_title, False))
        else:
            rows += [(story_id, piece, is_title, True) for piece in _windows(text, encoding, max_tokens)]
    return pd.DataFrame(rows, columns=UNIT_COLUMNS)

"""Reprints: the same story again, from another source or a later day,
counted once. Exact copies match on a hash of the normalised body; near
copies (a changed dateline, a corrected figure) on MinHash LSH over word
3-shingles (datasketch), verified by the estimated Jaccard similarity."""

from __future__ import annotations

import hashlib
import re

import pandas as pd
from datasketch import MinHash, MinHashLSH

NUM_PERM = 64
_WORDS = re.compile(r"[a-z0-9]+")


def _words(title: str | None, text: str) -> list[str]:
    return _WORDS.findall((text or title or "").lower())


def content_hash(title: str | None, text: str) -> str:
    return hashlib.sha1(" ".join(_words(title, text)).encode()).hexdigest()


def _minhash(words: list[str]) -> MinHash | None:
    shingles = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    if not shingles:
        return None
    signature = MinHash(num_perm=NUM_PERM, seed=1)
    signature.update_batch([shingle.encode() for shingle in sorted(shingles)])
    return signature


def find_reprints(stories: pd.DataFrame, earlier: pd.DataFrame, jaccard: float) -> pd.Series:
    """For each story of ``stories`` (index kept), the id of the story it
    reprints, or None for an original. Originals are taken in order of
    ``earlier`` (previous days), then the day's stories by (timestamp, id), so
    the result does not depend on the order days are processed in."""
    lsh = MinHashLSH(threshold=jaccard, num_perm=NUM_PERM)
    by_hash: dict[str, str] = {}
    signatures: dict[str, MinHash] = {}
    order: dict[str, int] = {}

    def original(story_id: str, words: list[str], digest: str, signature: MinHash | None) -> str | None:
        if digest in by_hash:
            return by_hash[digest]
        if signature is not None:
            matches = [key for key in lsh.query(signature) if signatures[key].jaccard(signature) >= jaccard]
            if matches:
                return min(matches, key=order.__getitem__)
        by_hash[digest] = story_id
        if signature is not None and story_id not in signatures:
            signatures[story_id] = signature
            order[story_id] = len(order)
            lsh.insert(story_id, signature)
        return None

    for row in earlier.itertuples():
        words = _words(row.title, row.text)
        original(str(row.id), words, content_hash(row.title, row.text), _minhash(words))
    reprint_of = pd.Series(None, index=stories.index, dtype=object)
    ordered = stories.assign(_ts=stories["timestamp"].fillna("")).sort_values(["_ts", "id"])
    for index, row in zip(ordered.index, ordered.itertuples()):
        words = _words(row.title, row.text)
        reprint_of[index] = original(str(row.id), words, content_hash(row.title, row.text), _minhash(words))
    return reprint_of

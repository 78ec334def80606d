"""Self-training on unlabeled in-domain text: a teacher fine-tuned on the labels
scores corpus sentences, and the most confident of them join the training set
with the teacher's probabilities as soft targets (Du et al., 2021, "Self-training
Improves Pre-training for Natural Language Understanding"; Xie et al., 2020,
"noisy student"). The student starts again from the base, with dropout on."""

from __future__ import annotations

import random
import re

import numpy as np
import pandas as pd

from pipeline.config import LABELS
from pipeline.data.sources import split_sentences

_LETTERS = re.compile(r"[A-Za-z]")


def corpus_sentences(texts: list[str], min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentence-like pieces of ``texts``, deduplicated in first-seen order: between
    ``min_words`` and ``max_words`` words, mostly letters and not all capitals
    (newswire tables and headlines are dropped)."""
    seen: dict[str, None] = {}
    for text in texts:
        for sentence in split_sentences(text):
            words = sentence.split(" ")
            if not min_words <= len(words) <= max_words or sentence in seen:
                continue
            letters = _LETTERS.findall(sentence)
            if len(letters) < 0.6 * len(sentence.replace(" ", "")) or sentence.upper() == sentence:
                continue
            seen[sentence] = None
    return list(seen)


def unlabeled_sentences(corpus: list[str] | None, labeled: list[pd.DataFrame], option: str) -> list[str]:
    """``corpus_sentences`` of ``corpus`` that are in none of the ``labeled`` frames'
    texts; a clear error naming ``option`` if none is left."""
    known = set().union(*(set(frame["text"]) for frame in labeled))
    sentences = [s for s in corpus_sentences(corpus or []) if s not in known]
    if not sentences:
        raise ValueError(f"{option} needs a corpus of unlabeled text with sentences in it; none was given")
    return sentences


def sample_candidates(sentences: list[str], count: int, seed: int) -> list[str]:
    """At most ``count`` sentences, a seeded sample so that runs are repeatable."""
    if len(sentences) <= count:
        return list(sentences)
    return random.Random(seed).sample(sentences, count)


def select_pseudo_labels(texts: list[str], probs: np.ndarray, total: int, label_shares: np.ndarray) -> pd.DataFrame:
    """The ``total`` pseudo-labeled rows: for each label, the sentences the teacher
    gives that label with the highest probability, as many as the label's share of
    the labeled training set (so the class balance does not drift). Columns: text,
    label (the teacher's argmax), targets (its probabilities), confidence."""
    predicted = probs.argmax(axis=1)
    quotas = np.floor(np.asarray(label_shares, dtype=np.float64) * total).astype(int)
    chosen: list[int] = []
    for label_id, quota in enumerate(quotas):
        rows = np.flatnonzero(predicted == label_id)
        ranked = rows[np.argsort(-probs[rows, label_id], kind="stable")]
        chosen.extend(ranked[:quota].tolist())
    chosen.sort()
    return pd.DataFrame({
        "text": [texts[i] for i in chosen],
        "label": [LABELS[predicted[i]] for i in chosen],
        "targets": [probs[i].astype(np.float32).tolist() for i in chosen],
        "confidence": [float(probs[i].max()) for i in chosen],
    })

"""Token attributions by occlusion: a word's weight is how much the predicted
label's probability drops when the word's tokens are left out. One pass per
word, batched with the rest of the traffic; short texts only."""

from __future__ import annotations

import numpy as np
from tokenizers import Encoding


def occluded_inputs(encoding: Encoding) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """The character span of each word of ``encoding`` and its token ids without that word
    (special tokens kept)."""
    words: dict[int, list[int]] = {}
    for position, word in enumerate(encoding.word_ids):
        if word is not None:
            words.setdefault(word, []).append(position)
    spans, inputs = [], []
    for positions in words.values():
        start, end = encoding.offsets[positions[0]][0], encoding.offsets[positions[-1]][1]
        spans.append((start, end))
        left_out = set(positions)
        inputs.append([token for i, token in enumerate(encoding.ids) if i not in left_out])
    return spans, inputs


def top_words(text: str, spans: list[tuple[int, int]], full: np.ndarray, occluded: np.ndarray, label: int,
              top: int = 8) -> list[dict]:
    """Words by the size of their weight: positive supports ``label``."""
    weights = full[label] - occluded[:, label]
    order = np.argsort(-np.abs(weights), kind="stable")[:top]
    return [{"token": text[spans[i][0] : spans[i][1]], "weight": round(float(weights[i]), 6)} for i in order]

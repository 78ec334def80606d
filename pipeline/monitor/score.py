"""Story scores from the scores of their texts (title and sentences):
net sentiment = mean of P(positive) - P(negative), label shares, confidence."""

from __future__ import annotations

import numpy as np
import pandas as pd

from serving.model import OnnxClassifier

SCORE_COLUMNS = ["n_texts", "n_split", "net_sentiment", "positive_share", "negative_share", "neutral_share",
                 "confidence", "label"]


def score_texts(model: OnnxClassifier, texts: list[str]) -> np.ndarray:
    """Probabilities of each text; a text repeated in the day (boilerplate,
    a reprinted line) is scored once."""
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    if not len(unique):
        return np.zeros((0, len(model.labels)), dtype=np.float32)
    return model.probabilities(unique.tolist())[inverse]


def story_scores(units: pd.DataFrame, probs: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One row per story id of ``units``."""
    missing = {"positive", "negative"} - set(labels)
    if missing:
        raise ValueError(f"the model's labels {labels} lack {sorted(missing)}: net sentiment needs both")
    positive, negative = labels.index("positive"), labels.index("negative")
    predicted = probs.argmax(axis=1)
    frame = pd.DataFrame({
        "story_id": units["story_id"].to_numpy(),
        "split": units["split"].to_numpy(dtype=bool),
        "net": probs[:, positive] - probs[:, negative],
        "is_positive": predicted == positive,
        "is_negative": predicted == negative,
        "confidence": probs.max(axis=1),
        **{f"p_{label}": probs[:, i] for i, label in enumerate(labels)},
    })
    grouped = frame.groupby("story_id", sort=False)
    scores = pd.DataFrame({
        "n_texts": grouped.size(),
        "n_split": grouped["split"].sum(),
        "net_sentiment": grouped["net"].mean(),
        "positive_share": grouped["is_positive"].mean(),
        "negative_share": grouped["is_negative"].mean(),
        "confidence": grouped["confidence"].mean(),
    })
    scores["neutral_share"] = 1.0 - scores["positive_share"] - scores["negative_share"]
    mean_probs = grouped[[f"p_{label}" for label in labels]].mean().to_numpy()
    scores["label"] = [labels[i] for i in mean_probs.argmax(axis=1)]
    return scores[SCORE_COLUMNS].rename_axis("id").reset_index()

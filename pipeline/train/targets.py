"""What each training row is trained towards: a distribution over the labels.
One-hot from the label, or with ``agreement_soft_labels`` the share of annotators
who agreed (Financial PhraseBank's 100/75/66/50 levels); a distillation teacher's
probabilities are mixed in by ``pipeline.train.distill``. The fine-tuning loop
reads the ``targets`` column and knows nothing of where it came from."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import LABELS
from pipeline.train.evaluate import label_ids


def soft_targets(labels: np.ndarray, agreement: np.ndarray) -> np.ndarray:
    """One target distribution per row: the label gets the row's annotator
    agreement (percent, at least 1/num_labels), the other labels share the rest evenly."""
    num_labels = len(LABELS)
    share = np.clip(np.asarray(agreement, dtype=np.float64) / 100.0, 1.0 / num_labels, 1.0)
    targets = np.repeat(((1.0 - share) / (num_labels - 1))[:, None], num_labels, axis=1)
    targets[np.arange(len(labels)), labels] = share
    return targets.astype(np.float32)


def label_targets(frame: pd.DataFrame, soft_labels: bool) -> np.ndarray:
    """One target distribution per row: from annotator agreement with ``soft_labels``, else one-hot."""
    labels = label_ids(frame["label"])
    if not soft_labels:
        return np.eye(len(LABELS), dtype=np.float32)[labels]
    if "agreement" not in frame:
        raise ValueError("agreement_soft_labels needs an 'agreement' column in the training split")
    return soft_targets(labels, frame["agreement"].to_numpy())


def with_targets(frame: pd.DataFrame, soft_labels: bool) -> pd.DataFrame:
    """``frame`` with a ``targets`` column, built from its labels unless it has one."""
    if "targets" in frame:
        return frame
    return frame.assign(targets=list(label_targets(frame, soft_labels)))

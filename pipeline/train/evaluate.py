"""Test-split metrics and plots. numpy/sklearn only at import: the release
gate scores ONNX outputs with the same functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from pipeline.config import LABELS


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def label_ids(labels: pd.Series) -> np.ndarray:
    return labels.map({name: i for i, name in enumerate(LABELS)}).to_numpy()


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, agreement: np.ndarray | None = None) -> dict[str, float]:
    y_pred = probs.argmax(axis=1)
    classes = list(range(len(LABELS)))
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
    }
    for i, name in enumerate(LABELS):
        metrics[f"precision_{name}"] = float(precision[i])
        metrics[f"recall_{name}"] = float(recall[i])
        metrics[f"f1_{name}"] = float(f1[i])
    if len(np.unique(y_true)) == len(LABELS):
        metrics["roc_auc_ovr"] = float(roc_auc_score(y_true, probs, multi_class="ovr", labels=classes))
    if agreement is not None:
        for level in (100, 75, 66, 50):
            mask = agreement >= level
            if mask.any():
                name = "allagree" if level == 100 else f"agree{level}"
                metrics[f"accuracy_{name}"] = float(accuracy_score(y_true[mask], y_pred[mask]))
    return metrics


def plot_confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(LABELS))))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(matrix, display_labels=list(LABELS)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    if train:
        left.plot(*zip(*train), marker="o", label="train loss")
    if evals:
        left.plot([h["epoch"] for h in evals], [h["eval_loss"] for h in evals], marker="o", label="validation loss")
        right.plot([h["epoch"] for h in evals], [h["eval_macro_f1"] for h in evals], marker="o", label="validation macro-F1")
        right.plot([h["epoch"] for h in evals], [h["eval_accuracy"] for h in evals], marker="o", label="validation accuracy")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

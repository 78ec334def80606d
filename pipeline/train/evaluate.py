"""Test-split metrics and plots. numpy/sklearn only at import: the release
gate scores ONNX outputs with the same functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from pipeline.config import LABELS

AGREEMENT_LEVELS: tuple[int, ...] = (100, 75, 66, 50)
ECE_BINS = 15


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
    metrics["ece"] = expected_calibration_error(y_true, probs)
    if agreement is not None:
        for name, scores in agreement_slices(y_true, y_pred, agreement).items():
            metrics.update({f"{key}_{name}": value for key, value in scores.items()})
    return metrics


def slice_name(level: int) -> str:
    return "allagree" if level == 100 else f"agree{level}"


def agreement_slices(y_true: np.ndarray, y_pred: np.ndarray, agreement: np.ndarray) -> dict[str, dict[str, float]]:
    """Accuracy, macro-F1 and size of each Financial PhraseBank agreement slice:
    the sentences whose annotator agreement is at least the level (nested, as in
    the dataset's own files: 50Agree holds all of them)."""
    classes = list(range(len(LABELS)))
    slices: dict[str, dict[str, float]] = {}
    for level in AGREEMENT_LEVELS:
        mask = agreement >= level
        if mask.any():
            slices[slice_name(level)] = {
                "accuracy": float(accuracy_score(y_true[mask], y_pred[mask])),
                "macro_f1": float(f1_score(y_true[mask], y_pred[mask], labels=classes, average="macro", zero_division=0)),
                "n": float(mask.sum()),
            }
    return slices


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Top-label confidence in ``n_bins`` equal-width bins (lower, upper]: count,
    mean confidence and accuracy per bin (NaN where a bin is empty)."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: the share-weighted mean |accuracy - confidence| over the bins."""
    bins = reliability_bins(y_true, probs, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / len(y_true))


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


def plot_reliability_diagram(y_true: np.ndarray, probs: np.ndarray, path: Path, n_bins: int = ECE_BINS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability_bins(y_true, probs, n_bins)
    edges, filled = bins["edges"], bins["count"] > 0
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[filled], bins["accuracy"][filled], width=width, edgecolor="black", label="accuracy")
    top.bar(centers[filled], bins["confidence"][filled] - bins["accuracy"][filled], bottom=bins["accuracy"][filled],
            width=width, color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap")
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability (ECE {expected_calibration_error(y_true, probs, n_bins):.3f})")
    top.legend(loc="upper left")
    bottom.bar(centers, bins["count"], width=width, color="grey", edgecolor="black")
    bottom.set_xlabel("confidence (top label)")
    bottom.set_ylabel("sentences")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

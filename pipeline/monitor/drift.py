"""Does a window of scored news texts differ from the reference sample? Statistics on predicted
labels, text descriptors and encoder embeddings, with thresholds calibrated on in-distribution windows.

Written by hand rather than with Evidently 0.7.23: it fails to import on pandas 3 (it imports the
removed ``pandas.core.dtypes.common.infer_dtype_from_object``), would add 19 packages to the lock,
and its embeddings-drift report took 36-43 s per window (d=384), so 200 calibration windows would
take hours; the whole calibration here takes seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp
from threadpoolctl import threadpool_limits

LABELS = ("negative", "neutral", "positive")
DESCRIPTOR_NAMES = ("n_tokens", "unk_share", "truncated", "non_ascii_share")
STATISTIC_NAMES = ("prediction_js", "prediction_psi", *(f"descriptor_{name}" for name in DESCRIPTOR_NAMES),
                   "embedding_mmd")
FALSE_ALARM_RATE = 0.05
# Bonferroni: each statistic may exceed its threshold on at most 0.05/7 of in-distribution windows.
DEFAULT_QUANTILE = 1 - FALSE_ALARM_RATE / len(STATISTIC_NAMES)
PSEUDO_COUNT = 0.5  # per label bin: keeps PSI finite when a window has no text of a label
MMD_MAX_ROWS = 500
# A reference without a single unknown token or non-ASCII character calibrates a threshold of 0, and one
# accented name would then be drift: a mean share must move by at least a point to count.
SHARE_STATISTICS = ("descriptor_unk_share", "descriptor_truncated", "descriptor_non_ascii_share")
MIN_SHARE_SHIFT = 0.01


@dataclass(frozen=True)
class DriftSample:
    """Per text: softmax probabilities [n, 3] (LABELS order), mean-pooled embeddings [n, d] and
    descriptors [n, 4] (DESCRIPTOR_NAMES order)."""

    probs: np.ndarray
    embeddings: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self) -> None:
        rows = {len(self.probs), len(self.embeddings), len(self.descriptors)}
        if len(rows) != 1:
            raise ValueError(f"probs, embeddings and descriptors differ in rows: {sorted(rows)}")

    def take(self, index: np.ndarray) -> DriftSample:
        return DriftSample(self.probs[index], self.embeddings[index], self.descriptors[index])

    def __len__(self) -> int:
        return len(self.probs)


def text_descriptors(texts: list[str], encodings_ids: list[list[int]], unk_id: int, max_tokens: int) -> np.ndarray:
    """[n, 4] descriptors from the token ids of each text encoded WITHOUT truncation."""
    rows = []
    for text, ids in zip(texts, encodings_ids, strict=True):
        n_tokens = len(ids)
        unk_share = sum(token == unk_id for token in ids) / n_tokens if n_tokens else 0.0
        non_ascii_share = sum(ord(char) > 127 for char in text) / len(text) if text else 0.0
        rows.append((n_tokens, unk_share, float(n_tokens > max_tokens), non_ascii_share))
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(DESCRIPTOR_NAMES))


def label_shares(probs: np.ndarray) -> np.ndarray:
    """Shares of predicted labels (argmax), smoothed so that no bin is empty."""
    counts = np.bincount(np.argmax(probs, axis=1), minlength=len(LABELS)) + PSEUDO_COUNT
    return counts / counts.sum()


def _js(ref_shares: np.ndarray, cur_shares: np.ndarray) -> float:
    return float(jensenshannon(ref_shares, cur_shares, base=2))


def _psi(ref_shares: np.ndarray, cur_shares: np.ndarray) -> float:
    return float(np.sum((cur_shares - ref_shares) * np.log(cur_shares / ref_shares)))


def prediction_js(ref: DriftSample, cur: DriftSample) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the predicted-label histograms."""
    return _js(label_shares(ref.probs), label_shares(cur.probs))


def prediction_psi(ref: DriftSample, cur: DriftSample) -> float:
    """Population stability index over the three predicted-label bins."""
    return _psi(label_shares(ref.probs), label_shares(cur.probs))


def _ks(ref_values: np.ndarray, cur_values: np.ndarray) -> float:
    return float(ks_2samp(ref_values, cur_values, method="asymp").statistic)


def _mean_gap(ref_values: np.ndarray, cur_values: np.ndarray) -> float:
    return abs(float(cur_values.mean()) - float(ref_values.mean()))


# n_tokens: KS statistic, scale-free and sensitive to any change of the length distribution's shape.
# The shares are mostly zero with a few large values; what matters is how much of the input is unknown,
# truncated or non-ASCII overall, which the mean measures (KS would only see the gap in the mass at 0).
# For the 0/1 `truncated` the two coincide: both are the difference of proportions.
DESCRIPTOR_STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "n_tokens": _ks, "unk_share": _mean_gap, "truncated": _mean_gap, "non_ascii_share": _mean_gap}


def descriptor_statistics(ref: DriftSample, cur: DriftSample) -> dict[str, float]:
    return {f"descriptor_{name}": DESCRIPTOR_STATISTICS[name](ref.descriptors[:, column], cur.descriptors[:, column])
            for column, name in enumerate(DESCRIPTOR_NAMES)}


def _subsample(rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    if len(rows) <= max_rows:
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def _mean_off_diagonal(kernel: np.ndarray) -> float:
    n = len(kernel)
    return float((kernel.sum() - np.trace(kernel)) / (n * (n - 1)))


@dataclass(frozen=True)
class EmbeddingReference:
    """The reference side of the MMD, computed once: subsampled rows, RBF bandwidth (median pairwise
    distance of the reference) and the mean reference-reference kernel value."""

    rows: np.ndarray
    bandwidth: float
    kernel_xx: float

    @classmethod
    def build(cls, embeddings: np.ndarray, max_rows: int = MMD_MAX_ROWS, seed: int = 0) -> EmbeddingReference:
        rows = _subsample(embeddings, max_rows, seed)
        squared = _squared_distances(rows, rows)
        bandwidth = float(np.sqrt(np.median(squared[np.triu_indices(len(rows), k=1)])))
        if not bandwidth > 0:
            raise ValueError("reference embeddings are (mostly) identical: no kernel bandwidth")
        return cls(rows, bandwidth, _mean_off_diagonal(np.exp(-squared / (2 * bandwidth**2))))

    def mmd(self, embeddings: np.ndarray, max_rows: int = MMD_MAX_ROWS, seed: int = 0) -> float:
        """Unbiased MMD² between the reference and ``embeddings`` (may be slightly negative)."""
        rows = _subsample(embeddings, max_rows, seed)
        gamma = 1 / (2 * self.bandwidth**2)
        kernel_yy = _mean_off_diagonal(np.exp(-gamma * _squared_distances(rows, rows)))
        kernel_xy = float(np.exp(-gamma * _squared_distances(self.rows, rows)).mean())
        return self.kernel_xx + kernel_yy - 2 * kernel_xy


def embedding_mmd(ref_emb: np.ndarray, cur_emb: np.ndarray, max_rows: int = MMD_MAX_ROWS, seed: int = 0) -> float:
    """Unbiased MMD² with an RBF kernel, bandwidth by the median heuristic on the reference."""
    return EmbeddingReference.build(ref_emb, max_rows, seed).mmd(cur_emb, max_rows, seed)


@dataclass(frozen=True)
class ReferenceProfile:
    """What every window is compared with, precomputed once per reference sample."""

    sample: DriftSample
    label_shares: np.ndarray
    embeddings: EmbeddingReference

    @classmethod
    def build(cls, reference: DriftSample, seed: int = 0) -> ReferenceProfile:
        return cls(reference, label_shares(reference.probs), EmbeddingReference.build(reference.embeddings, seed=seed))

    def statistics(self, window: DriftSample) -> dict[str, float]:
        """Every statistic of ``window`` against the reference (larger = more drift), STATISTIC_NAMES order."""
        shares = label_shares(window.probs)
        return {"prediction_js": _js(self.label_shares, shares), "prediction_psi": _psi(self.label_shares, shares),
                **descriptor_statistics(self.sample, window), "embedding_mmd": self.embeddings.mmd(window.embeddings)}


def _profile(reference: DriftSample | ReferenceProfile) -> ReferenceProfile:
    return reference if isinstance(reference, ReferenceProfile) else ReferenceProfile.build(reference)


def _window_rows(rng: np.random.Generator, n_rows: int, window_size: int, groups: np.ndarray | None,
                 groups_per_window: int) -> np.ndarray:
    """A window's rows: at random, or from ``groups_per_window`` random groups (days) and more if they hold too few."""
    if groups is None:
        return rng.choice(n_rows, window_size, replace=False)
    order = rng.permutation(np.unique(groups))
    count = groups_per_window
    while (rows := np.flatnonzero(np.isin(groups, order[:count]))).size < window_size:
        count += 1
    return rng.choice(rows, window_size, replace=False)


def calibrate(reference: DriftSample | ReferenceProfile, pool: DriftSample, window_size: int, n_windows: int = 200,
              quantile: float = DEFAULT_QUANTILE, seed: int = 0, groups: np.ndarray | None = None,
              groups_per_window: int = 1) -> dict[str, float]:
    """Thresholds from ``n_windows`` random windows of ``pool`` (in-distribution texts not in the reference).

    With ``groups`` (a day per pool row), a window is built as the monitor builds its own: from
    ``groups_per_window`` random days of the past, so the day-to-day variation of the news mix is part of
    what counts as in-distribution; without, windows are drawn at random.

    All statistics vote ("drift" = any above its threshold), so by default each gets the Bonferroni
    quantile 1 - 0.05/7 and the false-alarm rate over all of them is at most 5 %. The threshold is the
    ceil((n_windows + 1) * quantile)-th smallest window value (the conformal order statistic), which keeps
    a fresh window's exceedance <= 1 - quantile for a finite number of windows too; when that rank exceeds
    n_windows (fewer than ~1/(1 - quantile) windows, as with the default 200) it is the largest value seen.
    Windows of a finite pool overlap and vary a little less than fresh ones: keep the pool several
    times ``window_size``.
    """
    if window_size > len(pool):
        raise ValueError(f"window_size {window_size} > pool size {len(pool)}")
    profile, rng = _profile(reference), np.random.default_rng(seed)
    # The matrices are small: one BLAS thread ran 200 windows in 2.2 s against 4.1 s with two on shared cores.
    with threadpool_limits(1):
        values = np.array([list(profile.statistics(pool.take(
            _window_rows(rng, len(pool), window_size, groups, groups_per_window))).values()) for _ in range(n_windows)])
    rank = min(math.ceil((n_windows + 1) * quantile), n_windows)
    thresholds = dict(zip(STATISTIC_NAMES, np.sort(values, axis=0)[rank - 1].tolist(), strict=True))
    return {name: max(value, MIN_SHARE_SHIFT) if name in SHARE_STATISTICS else value for name, value in thresholds.items()}


@dataclass
class DriftReport:
    statistics: dict[str, float]
    thresholds: dict[str, float]
    fired: list[str]
    drifted: bool
    n_reference: int
    n_window: int
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect(reference: DriftSample | ReferenceProfile, window: DriftSample, thresholds: dict[str, float],
           min_window: int = 50) -> DriftReport:
    """Compare ``window`` with the reference; every statistic above its threshold fires."""
    missing = set(STATISTIC_NAMES) - set(thresholds)
    if missing:
        raise ValueError(f"no threshold for {sorted(missing)}")
    n_reference = len(reference.sample if isinstance(reference, ReferenceProfile) else reference)
    if len(window) < min_window:
        return DriftReport({}, dict(thresholds), [], False, n_reference, len(window),
                           reason=f"insufficient data: {len(window)} texts < {min_window}")
    with threadpool_limits(1):
        statistics = _profile(reference).statistics(window)
    fired = [name for name in STATISTIC_NAMES if statistics[name] > thresholds[name]]
    return DriftReport(statistics, {name: thresholds[name] for name in STATISTIC_NAMES}, fired, bool(fired),
                       n_reference, len(window))


def save_thresholds(path: Path | str, thresholds: dict[str, float], meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({"thresholds": thresholds, "meta": meta}, indent=2, sort_keys=True))


def load_thresholds(path: Path | str) -> tuple[dict[str, float], dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    return {name: float(value) for name, value in data["thresholds"].items()}, data["meta"]

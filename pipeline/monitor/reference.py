"""What the drift checks compare: samples of texts as the champion sees them
(probabilities through the ONNX scoring path, encoder embeddings, text
descriptors), and a reference from the champion's training data whose
thresholds are calibrated on in-distribution windows of the same data.

The reference is the unlabeled corpus the champion was adapted on (news
sentences, the stream's own kind of text); without a corpus, the labeled
training sentences. It is built once per champion version."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from pipeline.config import Settings
from pipeline.data.sources import split_sentences
from pipeline.monitor.drift import DriftSample, calibrate, load_thresholds, save_thresholds, text_descriptors
from pipeline.monitor.models import MonitorModel
from pipeline.monitor.stories import plain_tokenizer

log = logging.getLogger(__name__)
# Part of the reference's cache key: raise it when how the reference or its thresholds are drawn changes.
REFERENCE_FORMAT = 3


def _unk_id(tokenizer) -> int:
    unk = json.loads(tokenizer.to_str())["model"].get("unk_token") or "[UNK]"
    found = tokenizer.token_to_id(unk)
    return -1 if found is None else found


def drift_sample(model: MonitorModel, texts: list[str]) -> DriftSample:
    classifier = model.classifier
    plain = plain_tokenizer(classifier.tokenizer)
    ids = [encoding.ids for encoding in plain.encode_batch(texts, add_special_tokens=False)]
    descriptors = text_descriptors(texts, ids, _unk_id(plain), classifier.max_length - 2)
    return DriftSample(probs=classifier.probabilities(texts), embeddings=model.encoder().embed(texts),
                       descriptors=descriptors)


def save_sample(path: Path, texts: list[str], sample: DriftSample) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, texts=np.array(texts, dtype=str), probs=sample.probs, embeddings=sample.embeddings,
             descriptors=sample.descriptors)
    tmp.replace(path)


def load_sample(path: Path) -> tuple[list[str], DriftSample]:
    with np.load(path) as data:
        return data["texts"].tolist(), DriftSample(probs=data["probs"], embeddings=data["embeddings"],
                                                   descriptors=data["descriptors"])


def sample_sentences(texts: list[str], n: int, seed: int) -> list[str]:
    """Up to ``n`` sentences, one drawn at random from each of up to ``n``
    texts: sentences of one story move together, so a window holds at most one
    of each (as the calibration windows, drawn from thousands of stories, do)."""
    rng = np.random.default_rng(seed)
    stories = [sentences for text in texts if (sentences := split_sentences(text))]
    chosen = rng.choice(len(stories), size=min(n, len(stories)), replace=False) if stories else []
    return list(dict.fromkeys(stories[i][rng.integers(len(stories[i]))] for i in sorted(chosen)))


def day_seed(day: date) -> int:
    return day.toordinal()


def reference_texts(settings: Settings, n_reference: int, per_day: int, min_days: int, seed: int = 0
                    ) -> tuple[list[str], list[str], np.ndarray | None, str]:
    """Reference sentences and calibration-pool sentences, drawn from different stories of the
    training data, and where they came from. When the data is dated over more than ``min_days``
    days, the pool holds up to ``per_day`` sentences of each day and their days; else it is
    ``n_reference`` sentences at random, without days."""
    if settings.corpus_path.is_file():
        frame, source = pd.read_parquet(settings.corpus_path, columns=["date", "text"]), str(settings.corpus_path)
    else:
        path = settings.labeled_dir / "train.parquet"
        frame, source = pd.read_parquet(path, columns=["text"]).assign(date=None), str(path)
    order = np.random.default_rng(seed).permutation(len(frame))
    half = len(frame) // 2
    reference = sample_sentences(frame["text"].iloc[order[:half]].tolist(), n_reference, seed)
    rest = frame.iloc[order[half:]]
    if rest["date"].nunique() <= min_days:
        pool = sample_sentences(rest["text"].tolist(), n_reference, seed + 1)
        return reference, pool, None, source
    pool, days = [], []
    for day, group in rest.dropna(subset=["date"]).groupby("date", sort=True):
        picked = sample_sentences(group["text"].tolist(), per_day, seed + 1)
        pool += picked
        days += [day] * len(picked)
    return reference, pool, np.array(days), source


def ensure_reference(settings: Settings, model: MonitorModel) -> tuple[DriftSample, dict[str, float], dict]:
    """The champion's reference sample and calibrated thresholds, built on first use."""
    cfg = settings.monitor
    recipe = json.dumps([REFERENCE_FORMAT, cfg.drift_window_days, cfg.drift_window_texts, cfg.drift_reference_texts,
                         cfg.drift_calibration_windows])
    folder = (settings.state_dir / "monitor" / "reference" /
              f"v{model.version}-{model.onnx_sha256[:12]}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The days of a parallel backfill reach this together: one builds, the others wait and read.
    with FileLock(str(folder.parent / f"{folder.name}.lock"), timeout=3600):
        if (folder / "thresholds.json").is_file():
            _, reference = load_sample(folder / "reference.npz")
            thresholds, meta = load_thresholds(folder / "thresholds.json")
            return reference, thresholds, meta
        return _build_reference(settings, model, folder)


def _build_reference(settings: Settings, model: MonitorModel, folder: Path) -> tuple[DriftSample, dict[str, float], dict]:
    cfg = settings.monitor
    log.info("building the drift reference of version %s (once per champion)", model.version)
    # Calibration windows hold as many texts of each day as the monitor's windows do.
    per_day = math.ceil(cfg.drift_window_texts / cfg.drift_window_days)
    reference_list, pool_list, pool_days, source = reference_texts(
        settings, cfg.drift_reference_texts, per_day, min_days=cfg.drift_window_days)
    if len(pool_list) < cfg.drift_window_texts:
        raise ValueError(f"{source}: {len(pool_list)} pool sentences, fewer than a drift window "
                         f"({cfg.drift_window_texts}); lower monitor.drift_window_texts")
    reference, pool = drift_sample(model, reference_list), drift_sample(model, pool_list)
    dated = pool_days is not None
    thresholds = calibrate(reference, pool, window_size=cfg.drift_window_texts, n_windows=cfg.drift_calibration_windows,
                           groups=pool_days if dated else None, groups_per_window=cfg.drift_window_days)
    folder.mkdir(parents=True, exist_ok=True)
    save_sample(folder / "reference.npz", reference_list, reference)
    meta = {"source": source, "reference_texts": len(reference_list), "pool_texts": len(pool_list),
            "windows": f"{cfg.drift_window_days} random days each" if dated else "random texts",
            "window_texts": cfg.drift_window_texts, "calibration_windows": cfg.drift_calibration_windows,
            "model_version": model.version, "onnx_sha256": model.onnx_sha256}
    save_thresholds(folder / "thresholds.json", thresholds, meta)
    return reference, thresholds, meta

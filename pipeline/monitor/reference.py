"""What the drift checks compare: samples of texts as the champion sees them
(probabilities through the ONNX scoring path, encoder embeddings, text
descriptors), and a reference from the champion's training data whose
thresholds are calibrated on in-distribution windows of the same data.

The reference is the unlabeled corpus the champion was adapted on (news
sentences, the stream's own kind of text); without a corpus, the labeled
training sentences. It is built once per champion version."""

from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.data.sources import split_sentences
from pipeline.monitor.drift import DriftSample, calibrate, load_thresholds, save_thresholds, text_descriptors
from pipeline.monitor.models import MonitorModel
from pipeline.monitor.stories import plain_tokenizer

log = logging.getLogger(__name__)


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
    """Up to ``n`` distinct body sentences of ``texts``, drawn at random."""
    sentences = list(dict.fromkeys(s for text in texts for s in split_sentences(text)))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(sentences), size=min(n, len(sentences)), replace=False) if sentences else []
    return [sentences[i] for i in sorted(picked)]


def day_seed(day: date) -> int:
    return day.toordinal()


def reference_texts(settings: Settings, n_reference: int, n_pool: int, seed: int = 0) -> tuple[list[str], list[str], str]:
    """Reference and pool sentences drawn from different stories of the training data, and where they came from."""
    if settings.corpus_path.is_file():
        texts, source = pd.read_parquet(settings.corpus_path, columns=["text"])["text"].tolist(), str(settings.corpus_path)
    else:
        path = settings.labeled_dir / "train.parquet"
        texts, source = pd.read_parquet(path, columns=["text"])["text"].tolist(), str(path)
    order = np.random.default_rng(seed).permutation(len(texts))
    half = len(texts) // 2
    reference = sample_sentences([texts[i] for i in order[:half]], n_reference, seed)
    pool = sample_sentences([texts[i] for i in order[half:]], n_pool, seed + 1)
    return reference, pool, source


def ensure_reference(settings: Settings, model: MonitorModel) -> tuple[DriftSample, dict[str, float], dict]:
    """The champion's reference sample and calibrated thresholds, built on first use."""
    cfg = settings.monitor
    folder = (settings.state_dir / "monitor" / "reference" /
              f"v{model.version}-{model.onnx_sha256[:12]}-w{cfg.drift_window_texts}-r{cfg.drift_reference_texts}")
    if (folder / "thresholds.json").is_file():
        _, reference = load_sample(folder / "reference.npz")
        thresholds, meta = load_thresholds(folder / "thresholds.json")
        return reference, thresholds, meta
    log.info("building the drift reference of version %s (once per champion)", model.version)
    reference_list, pool_list, source = reference_texts(settings, cfg.drift_reference_texts, 2 * cfg.drift_reference_texts)
    if len(pool_list) < cfg.drift_window_texts:
        raise ValueError(f"{source}: {len(pool_list)} pool sentences, fewer than a drift window "
                         f"({cfg.drift_window_texts}); lower monitor.drift_window_texts")
    reference, pool = drift_sample(model, reference_list), drift_sample(model, pool_list)
    thresholds = calibrate(reference, pool, window_size=cfg.drift_window_texts, n_windows=cfg.drift_calibration_windows)
    folder.mkdir(parents=True, exist_ok=True)
    save_sample(folder / "reference.npz", reference_list, reference)
    meta = {"source": source, "reference_texts": len(reference_list), "pool_texts": len(pool_list),
            "window_texts": cfg.drift_window_texts, "calibration_windows": cfg.drift_calibration_windows,
            "model_version": model.version, "onnx_sha256": model.onnx_sha256}
    save_thresholds(folder / "thresholds.json", thresholds, meta)
    return reference, thresholds, meta

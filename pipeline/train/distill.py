"""Distillation from one fine-tuned teacher, typically a larger model than the
student (Hinton et al., 2015), as a builder of training targets: each training
row's target mixes its own with the teacher's probabilities, and a seeded sample
of unlabeled corpus sentences joins the training set with the teacher's
probabilities as targets, a transfer set as in Turc et al., 2019 ("Well-read
students learn better"). The sentences are not filtered by the teacher's
confidence: where it is unsure is what the labels do not say. The fine-tuning
loop then trains the student from the base on these rows; serving costs what the
student costs."""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import LABELS, TrainConfig
from pipeline.data.sources import split_sentences
from pipeline.train.checkpoints import cached_scores, weights_sha256
from pipeline.train.device import training_device_args
from pipeline.train.evaluate import classification_metrics, label_ids, softmax
from pipeline.train.model import load_classifier, predict_logits
from pipeline.train.targets import label_targets

_LETTERS = re.compile(r"[A-Za-z]")


def teacher_folder(teacher: str, download_dir: Path) -> str:
    """A local folder or hub id as given (packaged bases resolved as for a base); a
    registered model's ``models:/name@alias`` or ``models:/name/version`` URI is
    downloaded from the MLflow registry (the tracking URI must be set) and its
    transformers folder returned."""
    from pipeline.bases import resolve_base_model

    if not teacher.startswith("models:/"):
        return resolve_base_model(teacher)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=teacher, dst_path=str(download_dir)))
    # The project's pyfunc keeps the fine-tuned model as its ``hf_model`` artifact, a folder with a config.json.
    folders = sorted(config.parent for config in (local / "artifacts").rglob("config.json"))
    if not folders:
        raise ValueError(f"{teacher} holds no transformers model folder under artifacts/; is it a finsent model?")
    return str(folders[0])


def pinned_teacher(teacher: str) -> str:
    """A registry alias (``models:/name@alias``) as the version it names now
    (``models:/name/N``), so that the teacher scored is the one recorded even if
    the alias moves meanwhile; anything else as given."""
    if not teacher.startswith("models:/"):
        return teacher
    name, _, alias = teacher.removeprefix("models:/").partition("@")
    if not alias:
        return teacher
    import mlflow

    return f"models:/{name}/{mlflow.MlflowClient().get_model_version_by_alias(name, alias).version}"


def teacher_identity(teacher: str) -> str:
    """What a pinned teacher's scores belong to: a registry version as its URI, a
    local folder with its weights' digest (it may be overwritten), a hub id as given."""
    from pipeline.bases import resolve_base_model

    if teacher.startswith("models:/"):
        return teacher
    folder = Path(resolve_base_model(teacher))
    return f"{folder} weights {weights_sha256(folder)}" if folder.is_dir() else teacher


def label_order(id2label: dict[int, str]) -> list[int]:
    """The teacher's output column for each of the project's labels, matched by
    name (case-insensitive), so a teacher with its labels in another order
    (FinBERT's are positive, negative, neutral) still fits."""
    names = {str(name).lower(): int(index) for index, name in id2label.items()}
    missing = [label for label in LABELS if label not in names]
    if missing or len(names) != len(LABELS):
        raise ValueError(f"the teacher's labels {sorted(names)} are not the project's {list(LABELS)}")
    return [names[label] for label in LABELS]


def teacher_columns(folder: str) -> list[int]:
    """``label_order`` of the classifier saved in ``folder`` (or a hub id), read from
    its config before the model loads: ``load_classifier`` renames the outputs."""
    from transformers import AutoConfig

    import pipeline.train.pooling  # noqa: F401  registers the mean-pooling heads, so a saved one's config reads

    return label_order(AutoConfig.from_pretrained(folder).id2label)


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


def transfer_sentences(corpus: list[str] | None, labeled: list[pd.DataFrame], count: int, seed: int) -> list[str]:
    """A seeded sample of at most ``count`` corpus sentences that are in none of the
    ``labeled`` frames; a clear error if the corpus has none."""
    known = set().union(*(set(frame["text"]) for frame in labeled))
    sentences = [s for s in corpus_sentences(corpus or []) if s not in known]
    if not sentences:
        raise ValueError("distill_corpus_texts needs a corpus of unlabeled text with sentences in it; none was given")
    return list(sentences) if len(sentences) <= count else random.Random(seed).sample(sentences, count)


def teacher_rows(train: pd.DataFrame, validation: pd.DataFrame, cfg: TrainConfig, corpus: list[str] | None,
                 teacher: str, scores_path: Path, scores_key: dict) -> tuple[pd.DataFrame, dict]:
    """The student's training rows and what the teacher did. ``teacher``
    (``cfg.teacher_model`` pinned) scores the training rows, the validation rows
    and ``distill_corpus_texts`` corpus sentences; each training row's target is
    its own mixed with the teacher's probabilities (``distill_weight``), and the
    sentences join with the teacher's probabilities as targets. The scores are
    kept in ``scores_path`` for a retry under ``scores_key``, the fingerprint of
    the call (teacher, rows, corpus and config: all they depend on)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would load and run the teacher; score once, then train under torchrun.
        raise ValueError("teacher_model runs in one process; unset it under torchrun")
    sentences: list[str] = []
    if cfg.distill_corpus_texts > 0:
        sentences = transfer_sentences(corpus, [train, validation], cfg.distill_corpus_texts, cfg.seed)
    texts = {"train": train["text"].tolist(), "validation": validation["text"].tolist(), "corpus": sentences}

    def score() -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory() as download:
            folder = teacher_folder(teacher, Path(download))
            columns = teacher_columns(folder)
            model, tokenizer = load_classifier(folder)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        bf16 = training_device_args(cfg)["bf16"]
        return {name: softmax(predict_logits(model, tokenizer, rows, cfg.max_length, bf16=bf16)[:, columns])
                for name, rows in texts.items()}

    # Kept for a retry: a large teacher is minutes of scoring on a CPU, and the student's checkpoints resume
    # only on the targets they were trained on.
    probs = cached_scores(scores_path, scores_key, score)
    on_train, on_validation, on_corpus = probs["train"], probs["validation"], probs["corpus"]
    own = label_targets(train, cfg.agreement_soft_labels)
    mixed = (1.0 - cfg.teacher_share) * own + cfg.teacher_share * on_train
    transfer = pd.DataFrame({
        "text": sentences, "label": [LABELS[i] for i in on_corpus.argmax(axis=1)],
        "targets": list(on_corpus.astype(np.float32)), "agreement": 100,
    })
    rows = pd.concat([train.assign(targets=list(mixed.astype(np.float32))), transfer], ignore_index=True)
    teacher_val = classification_metrics(label_ids(validation["label"]), on_validation)
    info = {
        "teacher": cfg.teacher_model, "teacher_pinned": teacher, "weight": cfg.teacher_share,
        "teacher_val_macro_f1": round(float(teacher_val["macro_f1"]), 4),
        "teacher_val_accuracy": round(float(teacher_val["accuracy"]), 4),
        "corpus_rows": len(transfer),
        "corpus_labels": {label: int((transfer["label"] == label).sum()) for label in LABELS},
    }
    return rows, info

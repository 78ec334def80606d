"""Distillation of one fine-tuned teacher as a targets builder: corpus
sentences, the teacher's probabilities mixed into the training rows' targets,
and teacher-then-student runs on the tiny BERT."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import LABELS
from pipeline.data.ingest import load_split
from pipeline.config import TrainConfig
from pipeline.train.classify import finetune
from pipeline.train.distill import corpus_sentences, transfer_sentences
from pipeline.train.model import load_classifier, predict_logits
from pipeline.train.targets import soft_targets


def test_corpus_sentences_keep_prose_and_drop_tables_headlines_and_repeats():
    texts = [
        "Nova Corp said the U.S. Congress is weighing a new trade bill. Shr 1.35 dlrs vs 1.28 dlrs Net 12.3 mln vs 11.1 mln. "
        "Net profit rose to 5.1 mln dlrs from 3.2 mln dlrs a year ago.",
        "OIL PRICES FALL SHARPLY AFTER THE OPEC MEETING ENDS. Net profit rose to 5.1 mln dlrs from 3.2 mln dlrs a year ago.",
        "Revs 12,345,678 vs 11,234,567 1,234 5,678 9,012 3,456 7,890.",
    ]
    assert corpus_sentences(texts) == [
        "Nova Corp said the U.S. Congress is weighing a new trade bill.",
        "Net profit rose to 5.1 mln dlrs from 3.2 mln dlrs a year ago.",
    ]


def test_transfer_sentences_are_a_repeatable_sample_of_unlabeled_ones():
    corpus = [f"The company number {i} said its quarterly profit rose sharply." for i in range(100)]
    labeled = pd.DataFrame({"text": corpus[:3]})
    first = transfer_sentences(corpus, [labeled], 10, seed=1)
    assert first == transfer_sentences(corpus, [labeled], 10, seed=1) and len(set(first)) == 10
    assert first != transfer_sentences(corpus, [labeled], 10, seed=2)
    assert not set(first) & set(corpus[:3])
    assert transfer_sentences(corpus[:5], [labeled], 10, seed=1) == corpus[3:5]


def _reordered_teacher(classifier: Path, folder: Path, order: list[str]) -> Path:
    """``classifier`` saved with its outputs in ``order`` (head rows permuted to match),
    so it predicts the same but labels its columns another way."""
    model, tokenizer = load_classifier(str(classifier))
    rows = [LABELS.index(label) for label in order]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[rows].clone())
        model.classifier.bias.copy_(model.classifier.bias[rows].clone())
    model.config.id2label = dict(enumerate(order))
    model.config.label2id = {label: i for i, label in enumerate(order)}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_teachers_probabilities_and_the_corpus_it_labels_train_the_student(tmp_path, ingested, tiny_classifier, monkeypatch):
    from pipeline.train import classify
    from pipeline.train.evaluate import softmax

    # Labels in FinBERT's order: the teacher's columns must be matched by name, not position.
    teacher = _reordered_teacher(tiny_classifier, tmp_path / "teacher", ["positive", "negative", "neutral"])
    reference, reference_tokenizer = load_classifier(str(tiny_classifier))
    train = load_split(ingested.labeled_dir, "train").sample(n=96, random_state=0).reset_index(drop=True)
    validation = load_split(ingested.labeled_dir, "validation")
    corpus = pd.read_parquet(ingested.corpus_path)["text"].tolist()
    training_frames = []

    def recording_tokenized(frame, *args, targets, **kwargs):
        if targets:
            training_frames.append(frame)
        return tokenized(frame, *args, targets=targets, **kwargs)

    tokenized = classify._tokenized
    monkeypatch.setattr(classify, "_tokenized", recording_tokenized)
    cfg = TrainConfig.model_validate({**ingested.train.model_dump(), "epochs": 1, "teacher_model": str(teacher),
                                      "distill_weight": 0.3, "distill_corpus_texts": 50})
    result = finetune(str(ingested.train.base_model), train, validation, tmp_path / "student", cfg, corpus=corpus)

    info = result["distillation"]
    [student_frame] = training_frames
    assert len(student_frame) == len(train) + info["corpus_rows"] and info["corpus_rows"] == 50
    expected = softmax(predict_logits(reference, reference_tokenizer, train["text"].tolist(), cfg.max_length))
    own = soft_targets(np.array([LABELS.index(x) for x in train["label"]]), train["agreement"].to_numpy())
    np.testing.assert_allclose(np.stack(student_frame["targets"][: len(train)]), 0.7 * own + 0.3 * expected, atol=1e-5)
    # Every sampled sentence is kept, however unsure the teacher is, with its probabilities as the target.
    transfer = student_frame.iloc[len(train):]
    assert not set(transfer["text"]) & (set(train["text"]) | set(validation["text"]))
    on_corpus = softmax(predict_logits(reference, reference_tokenizer, transfer["text"].tolist(), cfg.max_length))
    np.testing.assert_allclose(np.stack(transfer["targets"]), on_corpus, atol=1e-5)
    assert list(transfer["label"]) == [LABELS[i] for i in on_corpus.argmax(axis=1)]
    assert sum(info["corpus_labels"].values()) == 50
    gold = np.array([LABELS.index(x) for x in validation["label"]])
    on_validation = predict_logits(reference, reference_tokenizer, validation["text"].tolist(), cfg.max_length)
    assert info["teacher_val_accuracy"] == pytest.approx((on_validation.argmax(-1) == gold).mean(), abs=1e-4)
    steps = max(entry["step"] for entry in result["history"])
    assert steps == -(-(len(train) + 50) // cfg.batch_size)
    assert (tmp_path / "student" / "model" / "config.json").is_file()


def test_a_teacher_with_other_labels_or_without_a_corpus_is_refused(tmp_path, ingested, tiny_classifier):
    from pipeline.train.distill import label_order

    assert label_order({0: "Positive", 1: "negative", 2: "NEUTRAL"}) == [1, 2, 0]
    with pytest.raises(ValueError, match="not the project's"):
        label_order({0: "bearish", 1: "neutral", 2: "bullish"})
    train = load_split(ingested.labeled_dir, "train").head(32)
    cfg = ingested.train.model_copy(update={"epochs": 1, "teacher_model": str(tiny_classifier), "distill_corpus_texts": 5})
    with pytest.raises(ValueError, match="needs a corpus"):
        finetune(str(ingested.train.base_model), train, train, tmp_path, cfg, corpus=None)


def test_a_mean_pooled_teachers_labels_read_in_a_fresh_process(tmp_path, tiny_classifier):
    """The saved mean-pooling head's config type is the project's own; reading it
    must not depend on something else having imported the head first."""
    import json
    import subprocess
    import sys

    assert json.loads((tiny_classifier / "config.json").read_text())["model_type"].startswith("finsent_mean_pool")
    teacher = _reordered_teacher(tiny_classifier, tmp_path / "teacher", ["positive", "negative", "neutral"])
    code = f"from pipeline.train.distill import teacher_columns; print(teacher_columns({str(teacher)!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[1, 2, 0]"


def test_a_teacher_runs_figures_reach_mlflow_and_the_card_names_teacher_and_corpus(ingested, tiny_classifier, mlflow_server):
    from mlflow import MlflowClient

    from pipeline.train import jobs

    train = ingested.train.model_copy(update={"epochs": 1, "teacher_model": str(tiny_classifier),
                                              "distill_corpus_texts": 10})
    settings = ingested.model_copy(update={"tracking_uri": mlflow_server, "experiment": "teacher-test", "train": train})
    run_id = jobs.start_run(settings)["run_id"]
    result = jobs.finetune(settings, run_id, str(ingested.train.base_model))

    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.data.metrics["distill_corpus_rows"] == 10 == result["distillation"]["corpus_rows"]
    assert run.data.metrics["distill_teacher_val_macro_f1"] == result["distillation"]["teacher_val_macro_f1"]
    card = jobs.build_model_card(settings, run_id, Path(result["model_dir"])).read_text()
    assert f"fine-tuned teacher `{tiny_classifier}`" in card and "plus 10 unlabeled corpus sentences" in card
    assert "Unlabeled corpus (" in card

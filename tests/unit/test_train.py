import math

import numpy as np
import pandas as pd

from pipeline.config import LABELS
from pipeline.data.ingest import load_split
from pipeline.train.model import load_classifier, predict_logits
from pipeline.train.evaluate import classification_metrics, plot_confusion_matrix, softmax
from pipeline.train.masking import group_texts
from pipeline.train.mlm import adapt_mlm


def test_group_texts_packs_full_blocks_without_padding():
    blocks = group_texts([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4)
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_mlm_adaptation_measures_perplexity_and_decides(tmp_path, ingested):
    texts = pd.read_parquet(ingested.corpus_path)["text"].head(100).tolist()
    validation = load_split(ingested.labeled_dir, "validation")["text"].tolist()
    result = adapt_mlm(ingested.train.base_model, texts, validation, tmp_path, ingested.train)
    assert math.isfinite(result.perplexity_base) and math.isfinite(result.perplexity_adapted)
    assert result.blocks > 0 and result.steps == ingested.train.mlm_steps
    if result.used == "adapted":
        assert result.perplexity_adapted < result.perplexity_base
        assert (tmp_path / "model" / "config.json").is_file()
    else:
        assert result.model_dir == ingested.train.base_model


def test_finetuned_classifier_beats_chance_on_validation(ingested, tiny_classifier):
    model, tokenizer = load_classifier(str(tiny_classifier))
    assert [model.config.id2label[i] for i in range(3)] == list(LABELS)
    validation = load_split(ingested.labeled_dir, "validation")
    probs = softmax(predict_logits(model, tokenizer, validation["text"].tolist(), 64))
    assert probs.shape == (len(validation), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    y_true = validation["label"].map({name: i for i, name in enumerate(LABELS)}).to_numpy()
    # The majority class alone gets about 0.6; a trained model must not be worse than a third.
    assert classification_metrics(y_true, probs)["accuracy"] > 1 / 3


def test_metrics_and_confusion_plot(tmp_path):
    y_true = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.9 + 0.1 / 3
    metrics = classification_metrics(y_true, probs, agreement=np.array([100, 100, 100, 50, 66, 75]))
    assert metrics["accuracy"] == 5 / 6
    assert metrics["accuracy_allagree"] == 1.0
    assert metrics["f1_positive"] == 2 / 3
    assert 0.5 < metrics["roc_auc_ovr"] <= 1.0
    path = plot_confusion_matrix(y_true, probs.argmax(axis=1), tmp_path / "cm.png")
    assert path.stat().st_size > 1000

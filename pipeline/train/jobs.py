"""The train stage's steps as jobs: each reads its inputs from paths and
the MLflow run, logs into that run, and returns a JSON-able dict of URIs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd

from pipeline import registry
from pipeline.config import Settings
from pipeline.data.frozen import require_frozen_test_set
from pipeline.data.ingest import load_split
from pipeline.data.version import read_digest

log = logging.getLogger(__name__)


def _run_dir(settings: Settings, run_id: str, step: str) -> Path:
    # Keyed by run: a retried step overwrites its own output and nothing else.
    path = settings.runs_dir / run_id / step
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run(settings: Settings) -> dict:
    digest = read_digest(settings.project_dir)
    test_digest = require_frozen_test_set(settings.project_dir, load_split(settings.labeled_dir, "test"))
    run_id = registry.start_training_run(settings, digest, test_digest)
    return {"run_id": run_id, "data_digest": digest, "test_digest": test_digest}


def mlm_adapt(settings: Settings, run_id: str) -> dict:
    from pipeline.train.base import resolve_base_model
    from pipeline.train.mlm import adapt_mlm

    cfg = settings.train
    train = load_split(settings.labeled_dir, "train")
    validation = load_split(settings.labeled_dir, "validation")
    corpus: list[str] = []
    if settings.corpus_path.is_file():
        corpus = pd.read_parquet(settings.corpus_path)["text"].head(cfg.mlm_max_corpus_texts).tolist()
    result = adapt_mlm(
        resolve_base_model(cfg.base_model), corpus + train["text"].tolist(), validation["text"].tolist(),
        _run_dir(settings, run_id, "mlm"), cfg,
    )
    log.info("masked-LM adaptation: %s", result.reason)
    registry.connect(settings)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("mlm_perplexity_base", result.perplexity_base)
        if result.perplexity_adapted is not None:
            mlflow.log_metric("mlm_perplexity_adapted", result.perplexity_adapted)
        mlflow.log_params({"mlm_used": result.used, "mlm_blocks": result.blocks, "mlm_corpus_texts": len(corpus)})
        mlflow.set_tag("mlm_decision", result.reason)
    return result.to_dict()


def finetune(settings: Settings, run_id: str, model_dir: str) -> dict:
    from pipeline.train.classify import finetune as finetune_classifier
    from pipeline.train.evaluate import plot_training_curves

    out = _run_dir(settings, run_id, "finetune")
    result = finetune_classifier(
        model_dir, load_split(settings.labeled_dir, "train"), load_split(settings.labeled_dir, "validation"), out, settings.train
    )
    registry.connect(settings)
    with mlflow.start_run(run_id=run_id):
        for entry in result["history"]:
            step = int(round(entry.get("epoch", 0)))
            for key in ("loss", "eval_loss", "eval_macro_f1", "eval_accuracy"):
                if key in entry:
                    name = key.replace("eval_", "val_") if key.startswith("eval_") else "train_loss"
                    mlflow.log_metric(name, float(entry[key]), step=step)
        mlflow.log_metrics({"best_epoch": result["best_epoch"], "best_val_macro_f1": result["best_val_macro_f1"]})
        mlflow.log_artifact(str(plot_training_curves(result["history"], out / "training_curves.png")), "plots")
    return {key: value for key, value in result.items() if key != "history"}


def evaluate(settings: Settings, run_id: str, model_dir: str) -> dict:
    from pipeline.train.classify import load_classifier, predict_logits
    from pipeline.train.evaluate import classification_metrics, label_ids, plot_confusion_matrix, softmax

    out = _run_dir(settings, run_id, "evaluate")
    test = load_split(settings.labeled_dir, "test")
    model, tokenizer = load_classifier(model_dir)
    probs = softmax(predict_logits(model, tokenizer, test["text"].tolist(), settings.train.max_length))
    y_true = label_ids(test["label"])
    metrics = classification_metrics(y_true, probs, test["agreement"].to_numpy())
    plot = plot_confusion_matrix(y_true, probs.argmax(axis=1), out / "confusion_matrix.png")
    (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    registry.connect(settings)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{name}": value for name, value in metrics.items()})
        mlflow.log_artifact(str(plot), "plots")
        mlflow.log_artifact(str(out / "test_metrics.json"), "metrics")
    return {"metrics": metrics, "confusion_matrix": str(plot)}


def register(settings: Settings, run_id: str, model_dir: str) -> dict:
    version = registry.register_classifier(settings, run_id, Path(model_dir))
    return {
        "model_uri": f"models:/{version.name}@{registry.CANDIDATE}",
        "name": version.name,
        "version": version.version,
        "run_id": run_id,
    }

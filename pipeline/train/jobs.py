"""The train stage's steps as jobs: each reads its inputs from paths and
the MLflow run, logs into that run, and returns a JSON-able dict of URIs."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd

from pipeline import registry
from pipeline.config import LABELS, Settings, TrainConfig
from pipeline.data.frozen import require_frozen_test_set
from pipeline.data.ingest import load_split
from pipeline.data.version import read_digest
from pipeline.train import cache

log = logging.getLogger(__name__)
TRAIN_CONFIG_FILE = "train_config.json"


def _main_process() -> bool:
    """False on the other ranks under torchrun: rank 0 logs to MLflow for all of them."""
    return int(os.environ.get("RANK", "0")) == 0


def _run_dir(settings: Settings, run_id: str, step: str) -> Path:
    # Keyed by run: a retried step overwrites its own output and nothing else.
    path = settings.runs_dir / run_id / step
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run(settings: Settings, use_cache: bool = True) -> dict:
    """Opens the run the training steps log into; or, when a run with the same
    step-cache key registered a model (``pipeline.train.cache``), returns that
    run with ``cached: True`` and its version, and nothing is trained."""
    digest = read_digest(settings.project_dir)
    test_digest = require_frozen_test_set(settings.project_dir, load_split(settings.labeled_dir, "test"))
    key = cache.cache_key(settings, test_digest)
    found = cache.find_cached_run(settings, key) if use_cache else None
    if found is None:
        run_id = registry.start_training_run(settings, digest, test_digest, cache_key=key)
        return {"run_id": run_id, "cached": False, "data_digest": digest, "test_digest": test_digest, "cache_key": key}
    client = registry.connect(settings)
    hits = int(client.get_run(found.run_id).data.tags.get(cache.HITS_TAG, "0")) + 1
    client.set_tag(found.run_id, cache.REUSED_AT_TAG, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    client.set_tag(found.run_id, cache.HITS_TAG, str(hits))
    log.info("training skipped: data, code, config and base match run %s (version %s); --no-cache trains anyway",
             found.run_id, found.version)
    # The aliases stay where they are: this version was handed to the release when it was registered, and
    # @candidate also answers canary traffic, which a run that trained nothing should not move.
    return {"run_id": found.run_id, "cached": True, "model_version": found.version,
            "model_uri": f"models:/{settings.model_name}/{found.version}", "data_digest": digest,
            "test_digest": test_digest, "cache_key": key}


def cached_summary(settings: Settings, run: dict) -> dict:
    """What ``finsent train`` returns when ``start_run`` reused a run: its version, as ``register`` would say it."""
    client = registry.connect(settings)
    version = client.get_model_version(settings.model_name, run["model_version"])
    metrics = client.get_run(run["run_id"]).data.metrics
    return {
        "model_uri": run["model_uri"], "name": version.name, "version": version.version, "run_id": run["run_id"],
        "config_hash": version.tags.get("config_hash"), "cached": True,
        "test_metrics": {key.removeprefix("test_"): value for key, value in metrics.items() if key.startswith("test_")},
    }


def mlm_adapt(settings: Settings, run_id: str) -> dict:
    from pipeline.bases import resolve_base_model
    from pipeline.train.mlm import adapt_mlm

    cfg = settings.train
    train = load_split(settings.labeled_dir, "train")
    validation = load_split(settings.labeled_dir, "validation")
    corpus: list[str] = []
    if settings.corpus_path.is_file():
        corpus = pd.read_parquet(settings.corpus_path)["text"].head(cfg.mlm_max_corpus_texts).tolist()
    result = adapt_mlm(
        resolve_base_model(cfg.base_model, settings.bases_dir), corpus + train["text"].tolist(), validation["text"].tolist(),
        _run_dir(settings, run_id, "mlm"), cfg,
    )
    log.info("masked-LM adaptation (resumed from step %s): %s", result.resumed_from_step, result.reason)
    summary = {key: value for key, value in result.to_dict().items() if key != "history"}
    if not _main_process():
        return summary
    registry.connect(settings)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("mlm_perplexity_base", result.perplexity_base)
        if result.perplexity_adapted is not None:
            mlflow.log_metric("mlm_perplexity_adapted", result.perplexity_adapted)
        if result.perplexity_random_head is not None:
            mlflow.log_metric("mlm_perplexity_random_head", result.perplexity_random_head)
        for entry in result.history:
            if "loss" in entry:
                mlflow.log_metric("mlm_train_loss", float(entry["loss"]), step=int(entry["step"]))
        # A retried task logs into the same run: values that may differ between tries are metrics, not params.
        mlflow.log_metrics({"mlm_resumed_from_step": result.resumed_from_step or 0, "mlm_steps_run": result.steps_run})
        mlflow.log_params({"mlm_used": result.used, "mlm_blocks": result.blocks, "mlm_corpus_texts": len(corpus),
                           "mlm_head_fit_steps": result.head_fit_steps})
        mlflow.set_tag("mlm_decision", result.reason)
    return summary


def _trial_suffix(settings: Settings, trial: int | str) -> str:
    """Metric and plot name suffix of a sweep trial, so the trials' curves stay apart in one run."""
    from pipeline.train.sweep import sweep_trials

    return f"_trial{trial}" if len(sweep_trials(settings.train)) > 1 else ""


def finetune(settings: Settings, run_id: str, model_dir: str, trial: dict | None = None) -> dict:
    """Fine-tunes with ``settings.train``, or with a sweep trial's overrides of
    it; each trial writes to its own folder and logs its curves under its number."""
    from pipeline.train.classify import finetune as finetune_classifier
    from pipeline.train.evaluate import plot_training_curves
    from pipeline.train.sweep import sweep_trials, trial_config

    trial = trial or sweep_trials(settings.train)[0]
    cfg = trial_config(settings.train, trial)
    config_hash = registry.train_config_hash(cfg)
    suffix = _trial_suffix(settings, trial["trial"])
    out = _run_dir(settings, run_id, f"finetune/trial-{trial['trial']}")
    (out / TRAIN_CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
    if _main_process():
        # Before training, not after: a teacher given as a models:/ URI is downloaded from this registry, and
        # this step may be the first thing its process (an Airflow worker's, `finsent finetune`) does; without
        # connecting, MLflow would look in a local SQLite file. An unreachable server also fails here, not
        # after the training.
        registry.connect(settings)
    corpus = None
    if cfg.distill_corpus_texts > 0 and settings.corpus_path.is_file():
        corpus = pd.read_parquet(settings.corpus_path)["text"].tolist()
    result = finetune_classifier(
        model_dir, load_split(settings.labeled_dir, "train"), load_split(settings.labeled_dir, "validation"), out, cfg,
        corpus=corpus,
    )
    summary = {key: value for key, value in result.items() if key != "history"}
    if not _main_process():
        return {**summary, "config_hash": config_hash, "trial": trial}
    with mlflow.start_run(run_id=run_id):
        for entry in result["history"]:
            step = int(round(entry.get("epoch", 0)))
            for key in ("loss", "eval_loss", "eval_macro_f1", "eval_accuracy"):
                if key in entry:
                    name = key.replace("eval_", "val_") if key.startswith("eval_") else "train_loss"
                    mlflow.log_metric(name + suffix, float(entry[key]), step=step)
        mlflow.log_metrics({
            f"best_epoch{suffix}": result["best_epoch"], f"best_val_macro_f1{suffix}": result["best_val_macro_f1"],
            f"epochs_run{suffix}": result["epochs_run"], f"trainable_params{suffix}": result["trainable_params"],
        })
        mlflow.log_metric(f"finetune_resumed_from_epoch{suffix}", result["resumed_from_epoch"])
        if "distillation" in result:
            distillation = result["distillation"]
            mlflow.log_metrics({f"distill_teacher_val_macro_f1{suffix}": distillation["teacher_val_macro_f1"],
                                f"distill_corpus_rows{suffix}": distillation["corpus_rows"]})
            mlflow.log_dict(distillation, f"distillation{suffix}.json")
        mlflow.log_artifact(str(plot_training_curves(result["history"], out / f"training_curves{suffix}.png")), "plots")
    return {**summary, "config_hash": config_hash, "trial": trial}


def evaluate(settings: Settings, run_id: str, model_dir: str) -> dict:
    """Test-split metrics (with agreement slices and calibration error) and plots."""
    from pipeline.train.evaluate import (
        classification_metrics, label_ids, plot_confusion_matrix, plot_reliability_diagram, softmax,
    )
    from pipeline.release.behavioural import load_suite, run_suite
    from pipeline.train.model import load_classifier, predict_logits

    out = _run_dir(settings, run_id, "evaluate")
    test = load_split(settings.labeled_dir, "test")
    model, tokenizer = load_classifier(model_dir)
    probs = softmax(predict_logits(model, tokenizer, test["text"].tolist(), settings.train.max_length))
    y_true = label_ids(test["label"])
    metrics = classification_metrics(y_true, probs, test["agreement"].to_numpy())
    plots = [
        plot_confusion_matrix(y_true, probs.argmax(axis=1), out / "confusion_matrix.png"),
        plot_reliability_diagram(y_true, probs, out / "reliability_diagram.png"),
    ]
    (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    behaviour = run_suite(load_suite(settings.release.behavioural_dir, LABELS),
                          lambda texts: softmax(predict_logits(model, tokenizer, texts, settings.train.max_length)), LABELS)
    (out / "behaviour.json").write_text(json.dumps(behaviour, indent=2))
    registry.connect(settings)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{name}": value for name, value in metrics.items()})
        mlflow.log_metrics({f"behaviour_{name}": entry["pass_rate"] for name, entry in behaviour["capabilities"].items()})
        mlflow.log_artifact(str(out / "behaviour.json"), "metrics")
        for plot in plots:
            mlflow.log_artifact(str(plot), "plots")
        mlflow.log_artifact(str(out / "test_metrics.json"), "metrics")
    return {"metrics": metrics, "confusion_matrix": str(plots[0]), "reliability_diagram": str(plots[1])}


def _trained_config(settings: Settings, model_dir: Path) -> TrainConfig:
    """The config the model was trained with (a sweep trial's, not necessarily ``settings.train``)."""
    saved = model_dir.parent / TRAIN_CONFIG_FILE
    return TrainConfig.model_validate_json(saved.read_text()) if saved.is_file() else settings.train


def build_model_card(settings: Settings, run_id: str, model_dir: Path) -> Path:
    """Writes the model card of ``run_id``'s model from what the run recorded."""
    from pipeline.train.model_card import ModelCardInputs, labeled_source, write_model_card

    cfg = _trained_config(settings, model_dir)
    config_hash = registry.train_config_hash(cfg)
    client = registry.connect(settings)
    run = client.get_run(run_id)
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    suffix = _trial_suffix(settings, model_dir.parent.name.removeprefix("trial-"))
    source, is_fpb = labeled_source(settings)
    # The corpus shaped the model if the adapted masked-LM was kept or distillation used its sentences.
    adapted = params.get("mlm_used") == "adapted" and params.get("mlm_corpus_texts", "0") != "0"
    corpus_used = adapted or metrics.get(f"distill_corpus_rows{suffix}", 0) > 0
    corpus = str(settings.reuters_dir or settings.corpus_path) if corpus_used else None
    card = ModelCardInputs(
        model_name=settings.model_name, run_id=run_id, base_model=cfg.base_model,
        mlm_decision=f"{params.get('mlm_used', 'not run')} ({tags.get('mlm_decision', 'no decision recorded')})",
        data_digest=tags.get("data_digest", "unknown"), test_digest=tags.get("test_digest", "unknown"),
        git_commit=tags.get("git_commit") or registry.git_commit(settings.project_dir),
        config_hash=config_hash, train_config=cfg.model_dump(mode="json"),
        test_metrics={key.removeprefix("test_"): value for key, value in metrics.items() if key.startswith("test_")},
        behaviour={key.removeprefix("behaviour_"): value for key, value in metrics.items() if key.startswith("behaviour_")},
        labeled_source=source, phrasebank=is_fpb, corpus_source=corpus,
        finetune={
            key: cast(metrics[key + suffix])
            for key, cast in (("best_epoch", int), ("best_val_macro_f1", float), ("trainable_params", int))
            if key + suffix in metrics
        },
    )
    return write_model_card(card, _run_dir(settings, run_id, "register") / registry.MODEL_CARD)


def register(settings: Settings, run_id: str, model_dir: str) -> dict:
    model_path = Path(model_dir)
    card = build_model_card(settings, run_id, model_path)
    config_hash = registry.train_config_hash(_trained_config(settings, model_path))
    version = registry.register_classifier(settings, run_id, model_path, model_card=card, tags={"config_hash": config_hash})
    freed = 0
    if not settings.keep_checkpoints:
        from pipeline.train.checkpoints import remove_checkpoint_folders

        freed = remove_checkpoint_folders(settings.runs_dir / run_id)
        log.info("registered; removed the run's training checkpoints (%.0f MB)", freed / 1e6)
    return {
        "model_uri": f"models:/{version.name}@{registry.CANDIDATE}",
        "name": version.name,
        "version": version.version,
        "run_id": run_id,
        "config_hash": config_hash,
        "model_card": str(card),
        "checkpoint_bytes_removed": freed,
    }

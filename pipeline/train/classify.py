"""Fine-tuning a sequence classifier, best epoch picked on validation macro-F1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import LABELS, TrainConfig
from pipeline.train.evaluate import classification_metrics, label_ids, softmax


def _tokenized(frame: pd.DataFrame, tokenizer, max_length: int):
    from datasets import Dataset

    encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)
    return Dataset.from_dict({
        **encoded,
        "labels": label_ids(frame["label"]).tolist(),
        "length": [len(ids) for ids in encoded["input_ids"]],
    })


def load_classifier(model_dir: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )
    return model, tokenizer


def _eval_metrics(prediction) -> dict[str, float]:
    metrics = classification_metrics(prediction.label_ids, softmax(prediction.predictions))
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def finetune(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path, cfg: TrainConfig) -> dict:
    """Trains, keeps the epoch with the best validation macro-F1, saves it to ``out_dir/model``."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_classifier(model_dir)
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch", save_total_limit=1,
        save_only_model=True, load_best_model_at_end=True, metric_for_best_model="macro_f1", greater_is_better=True,
        train_sampling_strategy="group_by_length", report_to="none", seed=cfg.seed,
    )
    trainer = Trainer(
        model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
        train_dataset=_tokenized(train, tokenizer, cfg.max_length),
        eval_dataset=_tokenized(validation, tokenizer, cfg.max_length),
        compute_metrics=_eval_metrics,
    )
    trainer.train()
    final_dir = out_dir / "model"
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(final_dir)
    evals = [h for h in trainer.state.log_history if "eval_macro_f1" in h]
    best = max(evals, key=lambda h: h["eval_macro_f1"])
    return {
        "model_dir": str(final_dir),
        "best_epoch": int(round(best["epoch"])),
        "best_val_macro_f1": float(best["eval_macro_f1"]),
        "best_val_accuracy": float(best["eval_accuracy"]),
        "history": trainer.state.log_history,
    }


@torch.no_grad()
def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits in input order; batches are length-sorted so padding stays small."""
    from tqdm.auto import tqdm

    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="predict", leave=False):
        index = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in index], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        logits[index] = model(**batch).logits.float().numpy()
    return logits

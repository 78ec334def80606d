"""Fine-tuning a sequence classifier: the one training loop. Each row trains
towards its ``targets`` distribution (``pipeline.train.targets``: labels or
annotator agreement; ``pipeline.train.distill``: a teacher's probabilities mixed
in). Full fine-tuning or LoRA adapters merged back into the base, layer-wise
learning-rate decay, warm-up, length-grouped dynamic padding, bf16 + fused AdamW
on CUDA; the epoch with the best validation macro-F1 is kept."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from pipeline.config import TrainConfig
from pipeline.train.checkpoints import (CHECKPOINTS, TEACHER_SCORES, finetune_fingerprint, prepare_checkpoint_dir,
                                        save_result, saved_result, texts_sha256)
from pipeline.train.evaluate import classification_metrics, label_ids, softmax
from pipeline.train.model import load_classifier
from pipeline.train.targets import with_targets

if TYPE_CHECKING:
    from pipeline.train.trainer import FinetuneTrainer

log = logging.getLogger(__name__)

# Attention projections LoRA adapts, per architecture family (BERT/RoBERTa, DistilBERT, Llama-style).
LORA_TARGETS: tuple[tuple[str, str], ...] = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"))
FINISHED = "finished.json"  # in the checkpoint folder once a run has ended


def _tokenized(frame: pd.DataFrame, tokenizer, max_length: int, targets: bool):
    """Tokenised rows with their ``targets`` distributions, or with label ids."""
    from datasets import Dataset

    encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)
    if targets:
        labels = np.stack(frame["targets"].tolist()).astype(np.float32).tolist()
    else:
        labels = label_ids(frame["label"]).tolist()
    return Dataset.from_dict({**encoded, "labels": labels, "length": [len(ids) for ids in encoded["input_ids"]]})


def _eval_metrics(prediction) -> dict[str, float]:
    metrics = classification_metrics(prediction.label_ids, softmax(prediction.predictions))
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def apply_lora(model, cfg: TrainConfig):
    """Wraps ``model`` in LoRA adapters on the attention query/value projections
    (alpha = 2 r, dropout 0.1, peft's usual pairing); the classifier head is trained
    in full (modules_to_save)."""
    from peft import LoraConfig, TaskType, get_peft_model

    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = next((list(pair) for pair in LORA_TARGETS if set(pair) <= leaf_names), None)
    head = next((name for name in ("classifier", "score") if name in leaf_names), None)
    if targets is None or head is None:
        raise ValueError(f"no known attention projections or classifier head for LoRA in {type(model).__name__}")
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.1,
        target_modules=targets, modules_to_save=[head],
    )
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_trainer(model, tokenizer, rows: pd.DataFrame, validation: pd.DataFrame, out_dir: Path,
                  cfg: TrainConfig) -> FinetuneTrainer:
    """The Trainer over ``rows`` (with a ``targets`` column) and ``validation``."""
    from transformers import DataCollatorWithPadding, TrainingArguments

    from pipeline.train.device import training_device_args
    from pipeline.train.trainer import FinetuneTrainer

    args = TrainingArguments(
        output_dir=str(out_dir / CHECKPOINTS), num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
        # A float below 1 is read as the warm-up share of all steps.
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        # Every epoch's checkpoint holds optimizer, scheduler and RNG state, so that a killed run
        # resumes from it (_train). A limit of 2 keeps the best and the last; at 1 the Trainer
        # deletes the last when it ends, and the full history with it.
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch", save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="macro_f1", greater_is_better=True,
        # Length-bucketed shuffled batches: FPB sentences vary from 5 to 150 tokens, so little padding.
        train_sampling_strategy="group_by_length", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        **training_device_args(cfg),
    )
    return FinetuneTrainer(
        model=model, args=args,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        train_dataset=_tokenized(rows, tokenizer, cfg.max_length, targets=True),
        eval_dataset=_tokenized(validation, tokenizer, cfg.max_length, targets=False),
        compute_metrics=_eval_metrics, layer_lr_decay=cfg.layer_lr_decay,
    )


def _train(model_dir: str, rows: pd.DataFrame, validation: pd.DataFrame, out_dir: Path, cfg: TrainConfig) -> dict:
    """One fine-tuning run, saved to ``out_dir/model``. A run cut off (a killed
    worker, a retried task) resumes from the last epoch checkpoint in ``out_dir``
    that the same model, rows and config wrote; one that had ended is taken as it
    ended, without another step."""
    from transformers import set_seed

    checkpoints = out_dir / CHECKPOINTS
    _, checkpoint = prepare_checkpoint_dir(checkpoints, finetune_fingerprint(model_dir, rows, validation, cfg))
    set_seed(cfg.seed)
    model, tokenizer = load_classifier(model_dir, cfg.pooling)
    if cfg.finetune_method == "lora":
        model = apply_lora(model, cfg)
    trainable, total = count_parameters(model)
    trainer = build_trainer(model, tokenizer, rows, validation, out_dir, cfg)
    resumed_from_epoch = 0
    if checkpoint is not None:
        resumed_from_epoch = int(round(json.loads((checkpoint / "trainer_state.json").read_text())["epoch"]))
        if (checkpoints / FINISHED).is_file():
            # It had ended: no epoch is left, and the Trainer only loads the best one.
            trainer.args.num_train_epochs = resumed_from_epoch
            log.info("fine-tuning in %s had ended at epoch %d: taking its best checkpoint", out_dir, resumed_from_epoch)
        else:
            log.info("resuming fine-tuning from %s (epoch %d of %d)", checkpoint, resumed_from_epoch, cfg.epochs)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.is_world_process_zero():
        (checkpoints / FINISHED).write_text(json.dumps({"epoch": trainer.state.epoch}))

    final_dir = out_dir / "model"
    result: dict = {}
    if trainer.is_world_process_zero():  # under torchrun every process trains; one writes the model
        model = trainer.model
        if cfg.finetune_method == "lora":
            model.save_pretrained(str(out_dir / "adapter"))
            model = model.merge_and_unload()
        model.save_pretrained(str(final_dir))
        tokenizer.save_pretrained(final_dir)
    if cfg.finetune_method == "lora":
        result["adapter_dir"] = str(out_dir / "adapter")
    evals = [h for h in trainer.state.log_history if "eval_macro_f1" in h]
    best = max(evals, key=lambda h: h["eval_macro_f1"])
    return {
        "model_dir": str(final_dir),
        "best_epoch": int(round(best["epoch"])),
        "best_val_macro_f1": float(best["eval_macro_f1"]),
        "best_val_accuracy": float(best["eval_accuracy"]),
        "epochs_run": len(evals),
        "finetune_method": cfg.finetune_method,
        "trainable_params": trainable,
        "total_params": total,
        "resumed_from_epoch": resumed_from_epoch,
        **result,
        "history": trainer.state.log_history,
    }


def finetune(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path, cfg: TrainConfig,
             corpus: list[str] | None = None) -> dict:
    """Builds the training rows' targets (with ``teacher_model``, from the
    teacher's probabilities and ``corpus`` sentences it labels), trains, keeps the
    epoch with the best validation macro-F1 and saves it to ``out_dir/model`` as a
    plain transformers model (LoRA adapters merged in; the adapter alone goes to
    ``out_dir/adapter``).

    Retried (a killed worker, a failed task) with the same model, rows, corpus
    and config, a call whose model was saved is taken as it was: its result is
    read back from ``out_dir/finetune_result.json`` (``from_saved_result``) and
    nothing trains or scores. One cut off before that reads the teacher's scores
    back and resumes from its checkpoints."""
    teacher = None
    if cfg.teacher_model:
        from pipeline.train.distill import pinned_teacher

        teacher = pinned_teacher(cfg.teacher_model)  # once: an alias may move while the step runs
    fingerprint = _call_fingerprint(model_dir, train, validation, cfg, corpus, teacher)
    saved = saved_result(out_dir, fingerprint)
    if saved is not None:
        log.info("fine-tuning in %s had ended and saved its model: taking it as it is", out_dir)
        (out_dir / TEACHER_SCORES).unlink(missing_ok=True)  # a worker killed right after the result may have left it
        return {**saved, "from_saved_result": True}
    distillation = None
    if teacher:
        from pipeline.train.distill import teacher_rows

        rows, distillation = teacher_rows(train, validation, cfg, corpus, teacher, out_dir / TEACHER_SCORES, fingerprint)
    else:
        rows = with_targets(train, cfg.agreement_soft_labels)
    result = _train(model_dir, rows, validation, out_dir, cfg)
    if distillation is not None:
        result["distillation"] = distillation
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process trains; rank 0 wrote the model
        save_result(out_dir, fingerprint, result)
        # Only now: a retry before this point reads the teacher's scores back.
        (out_dir / TEACHER_SCORES).unlink(missing_ok=True)
    return result


def _call_fingerprint(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, cfg: TrainConfig,
                      corpus: list[str] | None, teacher: str | None) -> dict:
    """What a saved result (and a teacher's kept scores) belong to: the rows and
    config, plus the corpus where the config reads it and the pinned ``teacher``'s identity."""
    fingerprint = finetune_fingerprint(model_dir, train, validation, cfg)
    if corpus is not None and cfg.distill_corpus_texts > 0:
        fingerprint["corpus_sha256"] = texts_sha256(corpus)
    if teacher:
        from pipeline.train.distill import teacher_identity

        fingerprint["teacher"] = teacher_identity(teacher)
    return fingerprint

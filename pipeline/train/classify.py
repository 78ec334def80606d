"""Fine-tuning a sequence classifier, best epoch picked on validation macro-F1.

Options (all from ``TrainConfig``): full fine-tuning or LoRA adapters merged
back into the base, class-weighted loss, label smoothing or soft targets from
annotator agreement, layer-wise learning-rate decay, warm-up, early stopping,
length-grouped dynamic padding, R-Drop, a moving average of the weights, a
weight soup of several members, self-training on corpus sentences, distillation
of an ensemble or of a larger fine-tuned teacher, bf16 + fused AdamW on CUDA."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import torch

from pipeline.config import LABELS, TrainConfig
from pipeline.train.checkpoints import (CHECKPOINTS, TEACHER_SCORES, cached_scores, finetune_fingerprint, save_result,
                                        saved_result, texts_sha256, weights_sha256)
from pipeline.train.evaluate import classification_metrics, label_ids, softmax

if TYPE_CHECKING:
    from pipeline.train.trainer import FinetuneTrainer

log = logging.getLogger(__name__)

# Attention projections LoRA adapts, per architecture family (BERT/RoBERTa, DistilBERT, Llama-style).
LORA_TARGETS: tuple[tuple[str, str], ...] = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"))
FINISHED = "finished.json"  # in the checkpoint folder once a run has ended


def _tokenized(frame: pd.DataFrame, tokenizer, max_length: int, soft_labels: bool = False):
    """Tokenised rows with label ids, or with ``soft_labels`` target
    distributions built from the ``agreement`` column; rows with a ``targets``
    distribution (pseudo-labels, distillation) train on it."""
    from datasets import Dataset

    encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)
    labels = label_ids(frame["label"])
    if soft_labels or "targets" in frame:
        labels = _row_targets(frame, soft_labels)
    if "targets" in frame:
        # Rows with a teacher's distribution (pseudo-labels, distillation) train on it; the others keep theirs.
        given = frame["targets"].notna().to_numpy()
        if given.any():
            labels[given] = np.stack(frame["targets"][given].tolist()).astype(np.float32)
    return Dataset.from_dict({
        **encoded,
        "labels": labels.tolist(),
        "length": [len(ids) for ids in encoded["input_ids"]],
    })


def _row_targets(frame: pd.DataFrame, soft_labels: bool) -> np.ndarray:
    """One target distribution per row: from annotator agreement with ``soft_labels``, else one-hot."""
    from pipeline.train.trainer import soft_targets

    labels = label_ids(frame["label"])
    if not soft_labels:
        return np.eye(len(LABELS), dtype=np.float32)[labels]
    if "agreement" not in frame:
        raise ValueError("agreement_soft_labels needs an 'agreement' column in the training split")
    return soft_targets(labels, frame["agreement"].to_numpy())


def load_classifier(model_dir: str, pooling: str = "cls"):
    """A sequence classifier with the project's labels and its tokenizer. A saved
    classifier keeps its own head; ``pooling="mean"`` puts a mean-pooling head on
    a BERT or MPNet base."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.train.pooling import MEAN_POOL_HEADS, MEAN_POOL_MODEL_TYPES

    labels = {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if pooling == "mean" and config.model_type in MEAN_POOL_HEADS:
        config_class, model_class = MEAN_POOL_HEADS[config.model_type]
        settings = {key: value for key, value in config.to_dict().items() if key not in ("model_type", "architectures")}
        return model_class.from_pretrained(model_dir, config=config_class(**{**settings, **labels})), tokenizer
    if pooling == "mean" and config.model_type not in MEAN_POOL_MODEL_TYPES:
        log.warning("mean pooling is for BERT and MPNet bases; %s keeps its own classification head", config.model_type)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, **labels), tokenizer


def _eval_metrics(prediction) -> dict[str, float]:
    metrics = classification_metrics(prediction.label_ids, softmax(prediction.predictions))
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def apply_lora(model, cfg: TrainConfig):
    """Wraps ``model`` in LoRA adapters on the attention query/value projections;
    the classifier head is trained in full (modules_to_save)."""
    from peft import LoraConfig, TaskType, get_peft_model

    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = next((list(pair) for pair in LORA_TARGETS if set(pair) <= leaf_names), None)
    head = next((name for name in ("classifier", "score") if name in leaf_names), None)
    if targets is None or head is None:
        raise ValueError(f"no known attention projections or classifier head for LoRA in {type(model).__name__}")
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, modules_to_save=[head],
    )
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_trainer(model, tokenizer, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path, cfg: TrainConfig) -> FinetuneTrainer:
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, TrainingArguments

    from pipeline.train.device import training_device_args
    from pipeline.train.trainer import FinetuneTrainer, class_weight_vector

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out_dir / CHECKPOINTS), num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
        # A float below 1 is read as the warm-up share of all steps.
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        # Every epoch's checkpoint holds optimizer, scheduler, RNG and early-stopping state, so that a
        # killed run resumes from it (_train_member). A limit of 2 keeps the best and the last; at 1 the
        # Trainer deletes the last when it ends, and the full history with it.
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch", save_total_limit=2,
        restore_callback_states_from_checkpoint=True,
        load_best_model_at_end=True, metric_for_best_model="macro_f1", greater_is_better=True,
        train_sampling_strategy=cfg.train_sampling, report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        **training_device_args(cfg),
    )
    train_labels = label_ids(train["label"])
    callbacks = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience > 0 else []
    return FinetuneTrainer(
        model=model, args=args,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None),
        train_dataset=_tokenized(train, tokenizer, cfg.max_length, soft_labels=cfg.agreement_soft_labels),
        eval_dataset=_tokenized(validation, tokenizer, cfg.max_length),
        compute_metrics=_eval_metrics, callbacks=callbacks,
        class_weights=class_weight_vector(train_labels, cfg.class_weights), layer_lr_decay=cfg.layer_lr_decay,
        label_smoothing=cfg.label_smoothing, rdrop_alpha=cfg.rdrop_alpha, ema_decay=cfg.ema_decay,
    )


class Member(NamedTuple):
    trainer: FinetuneTrainer  # on its best epoch
    tokenizer: object
    trainable: int
    total: int
    resumed_from_epoch: int  # 0: trained from the first epoch


def _train_member(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path, cfg: TrainConfig,
                  init_seed: int) -> Member:
    """One fine-tuning run; the classifier head is initialised from ``init_seed``,
    data order and dropout follow ``cfg.seed``. The trainer ends on its best epoch.
    A run cut off (a killed worker, a retried task) resumes from the last epoch
    checkpoint in ``out_dir`` that the same model, rows and config wrote; one that
    had ended is taken as it ended, without another step."""
    from transformers import set_seed

    from pipeline.train.checkpoints import prepare_checkpoint_dir

    checkpoints = out_dir / CHECKPOINTS
    _, checkpoint = prepare_checkpoint_dir(checkpoints, finetune_fingerprint(model_dir, train, validation, cfg, init_seed))
    set_seed(init_seed)
    model, tokenizer = load_classifier(model_dir, cfg.pooling)
    if cfg.finetune_method == "lora":
        model = apply_lora(model, cfg)
    trainable, total = count_parameters(model)
    trainer = build_trainer(model, tokenizer, train, validation, out_dir, cfg)
    resumed_from_epoch = 0
    if checkpoint is not None:
        resumed_from_epoch = int(round(json.loads((checkpoint / "trainer_state.json").read_text())["epoch"]))
        if (checkpoints / FINISHED).is_file():
            # It had ended (last epoch or early stopping): no epoch is left, and the Trainer only loads the best one.
            trainer.args.num_train_epochs = resumed_from_epoch
            log.info("fine-tuning in %s had ended at epoch %d: taking its best checkpoint", out_dir, resumed_from_epoch)
        else:
            log.info("resuming fine-tuning from %s (epoch %d of %d)", checkpoint, resumed_from_epoch, cfg.epochs)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.is_world_process_zero():
        (checkpoints / FINISHED).write_text(json.dumps({"epoch": trainer.state.epoch}))
    return Member(trainer, tokenizer, trainable, total, resumed_from_epoch)


def _best_eval(history: list[dict]) -> dict:
    return max((h for h in history if "eval_macro_f1" in h), key=lambda h: h["eval_macro_f1"])


def _save(model, tokenizer, final_dir: Path) -> None:
    model.save_pretrained(str(final_dir))
    tokenizer.save_pretrained(final_dir)


def finetune(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path, cfg: TrainConfig,
             corpus: list[str] | None = None) -> dict:
    """Trains, keeps the epoch with the best validation macro-F1, saves it to
    ``out_dir/model`` as a plain transformers model (LoRA adapters merged in;
    the adapter alone goes to ``out_dir/adapter``). With ``soup_size`` > 1 the
    saved model is the weight soup of that many members; with
    ``self_training_texts`` > 0 it is a student trained on the labels plus
    ``corpus`` sentences a first model labeled; with ``distill_teachers`` > 0 it
    is a student of that many teachers, with ``teacher_model`` a student of that
    fine-tuned classifier (``pipeline.train.distill``).

    Retried (a killed worker, a failed task) with the same model, rows, corpus
    and config, a call whose model was saved is taken as it was: its result is
    read back from ``out_dir/finetune_result.json`` (``from_saved_result``) and
    nothing trains or scores. One cut off before that resumes each of its runs
    from its checkpoints, takes members and teachers that had ended as they
    were, and reads their scores back."""
    teacher = None
    if cfg.teacher_model:
        from pipeline.train.distill import pinned_teacher

        teacher = pinned_teacher(cfg.teacher_model)  # once: an alias may move while the step runs
    fingerprint = _finetune_call_fingerprint(model_dir, train, validation, cfg, corpus, teacher)
    saved = saved_result(out_dir, fingerprint)
    if saved is not None:
        log.info("fine-tuning in %s had ended and saved its model: taking it as it is", out_dir)
        _remove_helpers(out_dir, cfg)  # a worker killed right after saving the result may have left them
        return {**saved, "from_saved_result": True}
    if teacher:
        from pipeline.train.distill import finetune_from_teacher

        result = finetune_from_teacher(model_dir, train, validation, out_dir, cfg, corpus, teacher, fingerprint)
    elif cfg.distill_teachers > 0:
        result = _finetune_distilled(model_dir, train, validation, out_dir, cfg, corpus)
    elif cfg.self_training_texts > 0:
        result = _finetune_self_training(model_dir, train, validation, out_dir, cfg, corpus or [])
    elif cfg.soup_size > 1:
        result = _finetune_soup(model_dir, train, validation, out_dir, cfg)
    else:
        result = _finetune_single(model_dir, train, validation, out_dir, cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process trains; rank 0 wrote the model
        save_result(out_dir, fingerprint, result)
        # Only now: a retry before this point takes each finished member or teacher, and their scores, as they are.
        _remove_helpers(out_dir, cfg)
    return result


def _finetune_call_fingerprint(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, cfg: TrainConfig,
                               corpus: list[str] | None, teacher: str | None) -> dict:
    """What a saved result (and a teacher's kept scores) belong to: the
    fine-tuning runs' fingerprint, plus the corpus where the config reads it and
    the pinned ``teacher``'s identity."""
    fingerprint = finetune_fingerprint(model_dir, train, validation, cfg, cfg.seed)
    if corpus is not None and (cfg.self_training_texts > 0 or cfg.distill_corpus_texts > 0):
        fingerprint["corpus_sha256"] = texts_sha256(corpus)
    if teacher:
        from pipeline.train.distill import teacher_identity

        fingerprint["teacher"] = teacher_identity(teacher)
    return fingerprint


def _remove_helpers(out_dir: Path, cfg: TrainConfig) -> None:
    """Removes what ``finetune`` builds in ``out_dir`` besides the model for the
    recipe ``cfg`` picks (its branches, in its order): members, teachers, scores."""
    if cfg.teacher_model:
        helpers = [out_dir / TEACHER_SCORES]
    elif cfg.distill_teachers > 0:
        helpers = [out_dir / f"teacher-{index}" for index in range(cfg.distill_teachers)]
    elif cfg.self_training_texts > 0:
        helpers = [out_dir / "teacher"]
    elif cfg.soup_size > 1:
        helpers = [*(out_dir / f"member-{index}" for index in range(cfg.soup_size)), out_dir / "soup"]
    else:
        helpers = []
    for path in helpers:  # a retry under torchrun: every process takes the saved result and gets here at once
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _finetune_single(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path,
                     cfg: TrainConfig) -> dict:
    trainer, tokenizer, trainable, total, resumed_from_epoch = _train_member(
        model_dir, train, validation, out_dir, cfg, cfg.seed)
    final_dir = out_dir / "model"
    result: dict = {}
    if cfg.finetune_method == "lora":
        result["adapter_dir"] = str(out_dir / "adapter")
    # Under torchrun every process trains; one writes the model.
    if trainer.is_world_process_zero():
        if cfg.finetune_method == "lora":
            trainer.model.save_pretrained(str(out_dir / "adapter"))
            _save(trainer.model.merge_and_unload(), tokenizer, final_dir)
        else:
            _save(trainer.model, tokenizer, final_dir)
    evals = [h for h in trainer.state.log_history if "eval_macro_f1" in h]
    best = _best_eval(evals)
    weights = trainer.class_weights
    return {
        "model_dir": str(final_dir),
        "best_epoch": int(round(best["epoch"])),
        "best_val_macro_f1": float(best["eval_macro_f1"]),
        "best_val_accuracy": float(best["eval_accuracy"]),
        "epochs_run": len(evals),
        "stopped_early": len(evals) < cfg.epochs,
        "finetune_method": cfg.finetune_method,
        "trainable_params": trainable,
        "total_params": total,
        "class_weights": None if weights is None else [round(float(w), 6) for w in weights],
        "resumed_from_epoch": resumed_from_epoch,
        **result,
        "history": trainer.state.log_history,
    }


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors; other tensors (index buffers) from the first."""
    return {
        name: torch.stack([state[name].float() for state in states]).mean(dim=0).to(tensor.dtype)
        if tensor.is_floating_point() else tensor.clone()
        for name, tensor in states[0].items()
    }


def _finetune_soup(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path, cfg: TrainConfig) -> dict:
    """Model soup (Wortsman et al., 2022): ``soup_size`` members share the
    initialisation (base and classifier head) and differ in data order and dropout.
    Greedy: ranked by validation macro-F1, each member joins the average only if the
    averaged model's validation macro-F1 does not drop; uniform: all are averaged. One
    model comes out, so export and serving cost what a single model costs; training
    costs the members."""
    members = []
    for index in range(cfg.soup_size):
        member_cfg = cfg.model_copy(update={"seed": cfg.seed + 1000 * index, "soup_size": 1})
        member_dir = out_dir / f"member-{index}"
        trainer, tokenizer, trainable, total, resumed_from_epoch = _train_member(
            model_dir, train, validation, member_dir, member_cfg, cfg.seed)
        model = trainer.model.merge_and_unload() if cfg.finetune_method == "lora" else trainer.model
        best = _best_eval(trainer.state.log_history)
        members.append({
            "seed": member_cfg.seed, "val_macro_f1": float(best["eval_macro_f1"]), "best_epoch": int(round(best["epoch"])),
            "resumed_from_epoch": resumed_from_epoch,
            "state": {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
            "history": trainer.state.log_history,
        })
        del trainer, model

    ranked = sorted(members, key=lambda m: m["val_macro_f1"], reverse=True)
    soup_model, tokenizer = load_classifier(model_dir, cfg.pooling)
    evaluator = build_trainer(soup_model, tokenizer, train, validation, out_dir / "soup",
                              cfg.model_copy(update={"finetune_method": "full"}))

    def validation_scores(states: list[dict]) -> dict:
        soup_model.load_state_dict(average_state_dicts(states))
        return evaluator.evaluate()

    if cfg.soup_method == "uniform":
        kept = ranked
        scores = validation_scores([m["state"] for m in kept])
    else:
        kept = [ranked[0]]
        scores = validation_scores([ranked[0]["state"]])
        for candidate in ranked[1:]:
            trial = validation_scores([m["state"] for m in [*kept, candidate]])
            if trial["eval_macro_f1"] >= scores["eval_macro_f1"]:
                kept, scores = [*kept, candidate], trial
    soup_model.load_state_dict(average_state_dicts([m["state"] for m in kept]))
    final_dir = out_dir / "model"
    if evaluator.is_world_process_zero():
        _save(soup_model, tokenizer, final_dir)
    best = ranked[0]
    return {
        "model_dir": str(final_dir),
        "best_epoch": best["best_epoch"],
        "best_val_macro_f1": float(scores["eval_macro_f1"]),
        "best_val_accuracy": float(scores["eval_accuracy"]),
        "epochs_run": len(best_evals := [h for h in best["history"] if "eval_macro_f1" in h]),
        "stopped_early": len(best_evals) < cfg.epochs,
        "finetune_method": cfg.finetune_method,
        "trainable_params": trainable,
        "total_params": total,
        "class_weights": None if evaluator.class_weights is None else [round(float(w), 6) for w in evaluator.class_weights],
        "soup": {
            "members": [{key: m[key] for key in ("seed", "val_macro_f1", "best_epoch", "resumed_from_epoch")}
                        for m in members],
            "kept_seeds": [m["seed"] for m in kept],
        },
        "history": best["history"],
    }


def _refuse_under_torchrun(option: str) -> None:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would train the first models, and read them before rank 0 wrote them.
        raise ValueError(f"{option} runs in one process; unset it under torchrun")


def _with_teacher_targets(train: pd.DataFrame, teacher_probs: np.ndarray, cfg: TrainConfig) -> pd.DataFrame:
    """``train`` with each row's target its own (1 - ``distill_weight``) mixed with the teacher's probabilities."""
    own = _row_targets(train, cfg.agreement_soft_labels)
    targets = (1.0 - cfg.distill_weight) * own + cfg.distill_weight * teacher_probs
    return train.assign(targets=list(targets.astype(np.float32)))


def _finetune_distilled(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path,
                        cfg: TrainConfig, corpus: list[str] | None) -> dict:
    """Ensemble distillation (Hinton et al., 2015): ``distill_teachers`` models
    fine-tune with the recipe under other seeds; the mean of their probabilities
    on each training row, weighted ``distill_weight`` against the row's own target,
    becomes the row's target, and the student trains from ``model_dir`` again. The
    teachers disagree most, and spread their probability unevenly, where a
    sentence is ambiguous: that is what the student learns beyond the labels. One
    model comes out; training costs the teachers and the student."""
    _refuse_under_torchrun("distill_teachers")
    single = cfg.model_copy(update={"distill_teachers": 0})
    texts = {"train": train["text"].tolist(), "validation": validation["text"].tolist()}
    mean_probs = {name: np.zeros((len(rows), len(LABELS)), dtype=np.float64) for name, rows in texts.items()}
    teachers = []
    for index in range(cfg.distill_teachers):
        teacher_cfg = single.model_copy(update={"seed": cfg.seed + 1000 * (index + 1)})
        teacher_dir = out_dir / f"teacher-{index}"
        result = finetune(model_dir, train, validation, teacher_dir, teacher_cfg, corpus=corpus)
        probs = _teacher_scores(result["model_dir"], texts, cfg.max_length, teacher_dir / TEACHER_SCORES)
        for name in texts:
            mean_probs[name] += probs[name] / cfg.distill_teachers
        teachers.append({"seed": teacher_cfg.seed, "val_macro_f1": result["best_val_macro_f1"]})
    student = finetune(model_dir, _with_teacher_targets(train, mean_probs["train"], cfg), validation, out_dir, single,
                       corpus=corpus)
    ensemble_val = classification_metrics(label_ids(validation["label"]), mean_probs["validation"])
    student["distillation"] = {
        "teachers": teachers, "weight": cfg.distill_weight,
        "ensemble_val_macro_f1": round(float(ensemble_val["macro_f1"]), 4),
        "ensemble_val_accuracy": round(float(ensemble_val["accuracy"]), 4),
    }
    return student


def _finetune_self_training(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, out_dir: Path,
                            cfg: TrainConfig, corpus: list[str]) -> dict:
    """A teacher fine-tunes on the labels and scores a seeded sample of the corpus
    sentences; the student trains from ``model_dir`` again on the labels plus the
    ``self_training_texts`` most confident sentences, their targets the teacher's
    probabilities. Training costs the teacher, the scoring and a student on the
    larger set; one model comes out."""
    from pipeline.train.self_training import sample_candidates, select_pseudo_labels, unlabeled_sentences

    _refuse_under_torchrun("self_training_texts")
    sentences = unlabeled_sentences(corpus, [train, validation], "self_training_texts")
    single = cfg.model_copy(update={"self_training_texts": 0})
    teacher = finetune(model_dir, train, validation, out_dir / "teacher", single)
    candidates = sample_candidates(sentences, cfg.self_training_candidates, cfg.seed)
    probs = _teacher_scores(teacher["model_dir"], {"candidates": candidates}, cfg.max_length,
                            out_dir / "teacher" / TEACHER_SCORES)["candidates"]
    shares = np.bincount(label_ids(train["label"]), minlength=len(LABELS)) / len(train)
    pseudo = select_pseudo_labels(candidates, probs, cfg.self_training_texts, shares)
    labeled = train if "targets" in train else train.assign(targets=None)
    augmented = pd.concat([labeled, pseudo.drop(columns="confidence").assign(agreement=100)],
                          ignore_index=True)
    student = finetune(model_dir, augmented, validation, out_dir, single)
    student["self_training"] = {
        "corpus_sentences": len(sentences), "candidates": len(candidates), "pseudo_rows": len(pseudo),
        "pseudo_labels": {label: int((pseudo["label"] == label).sum()) for label in LABELS},
        "min_confidence": round(float(pseudo["confidence"].min()), 4) if len(pseudo) else None,
        "teacher_val_macro_f1": teacher["best_val_macro_f1"],
    }
    return student


def _teacher_scores(teacher_dir: str, texts: dict[str, list[str]], max_length: int, path: Path) -> dict[str, np.ndarray]:
    """The probabilities the classifier in ``teacher_dir`` gives each list of
    ``texts``, kept in ``path`` for a retry with the same weights and texts."""
    def score() -> dict[str, np.ndarray]:
        model, tokenizer = load_classifier(teacher_dir)
        return {name: softmax(predict_logits(model, tokenizer, rows, max_length)) for name, rows in texts.items()}

    key = {"teacher_weights_sha256": weights_sha256(Path(teacher_dir)), "max_length": max_length,
           "texts_sha256": {name: texts_sha256(rows) for name, rows in texts.items()}}
    return cached_scores(path, key, score)


@torch.no_grad()
def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
                   bf16: bool = False) -> np.ndarray:
    """Logits in input order, computed on the model's device (under bf16 autocast
    with ``bf16``); batches are length-sorted so padding stays small."""
    from tqdm.auto import tqdm

    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="predict", leave=False):
        index = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in index], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits[index] = model(**batch.to(model.device)).logits.float().cpu().numpy()
    return logits

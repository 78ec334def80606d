"""Loading a sequence classifier with the project's labels, and running it:
shared by fine-tuning, evaluation and a distillation teacher."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.config import LABELS

log = logging.getLogger(__name__)


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

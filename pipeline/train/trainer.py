"""The Trainer used for fine-tuning: cross-entropy against target distributions
and layer-wise learning-rate decay. Kept apart from ``classify`` because importing
``transformers.Trainer`` takes seconds that inference callers should not pay."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from transformers import Trainer

_LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_lr_scale(name: str, num_layers: int, decay: float) -> float:
    """ELECTRA-style decay: the head (pooler, classifier) and the top encoder
    layer train at the full rate, layer i at decay^(L-1-i), embeddings at decay^L."""
    if "embeddings" in name:
        return decay**num_layers
    match = _LAYER_INDEX.search(name)
    if match:
        return decay ** (num_layers - 1 - int(match.group(1)))
    return 1.0


def llrd_param_groups(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, decay: float, decay_names: set[str]
) -> list[dict]:
    """Optimizer parameter groups, one per (learning rate, weight decay); only
    parameters in ``decay_names`` get weight decay (not biases or LayerNorm)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    indices = [int(m.group(1)) for n, _ in named if (m := _LAYER_INDEX.search(n)) and "embeddings" not in n]
    num_layers = max(indices) + 1 if indices else 0
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        scale = layer_lr_scale(name, num_layers, decay)
        wd = weight_decay if name in decay_names else 0.0
        group = groups.setdefault((scale, wd), {"params": [], "lr": learning_rate * scale, "weight_decay": wd, "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["lr"], g["weight_decay"]))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against label ids, or against target distributions
    when ``labels`` is a float [batch, num_labels] tensor."""
    logits = logits.float().view(-1, logits.shape[-1])
    if not labels.dtype.is_floating_point:
        return F.cross_entropy(logits, labels.view(-1))
    return -(labels.view(logits.shape) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class FinetuneTrainer(Trainer):
    """Trainer with target distributions in the loss and layer-wise learning-rate decay."""

    def __init__(self, *args, layer_lr_decay: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_lr_decay = layer_lr_decay
        # Sequence classifiers take **kwargs but their loss is a per-batch mean that ignores
        # num_items_in_batch; left True, the Trainer multiplies it by the number of DDP processes.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = classification_loss(logits, labels)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.layer_lr_decay == 1.0:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = llrd_param_groups(
            opt_model, self.args.learning_rate, self.args.weight_decay, self.layer_lr_decay,
            set(self.get_decay_parameter_names(opt_model)),
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

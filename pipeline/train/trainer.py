"""The Trainer used for fine-tuning: cross-entropy with class weights, label
smoothing or soft targets, R-Drop consistency, layer-wise learning-rate decay, and
an exponential moving average of the weights. Kept apart from
``classify`` because importing ``transformers.Trainer`` takes seconds that
inference callers should not pay."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from pipeline.config import LABELS

_LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def class_weight_vector(labels: np.ndarray, spec: str | list[float]) -> torch.Tensor | None:
    """Loss weight per label id: None for "none"; "balanced" is the inverse
    label frequency of ``labels``, normalised to mean 1; a list is used as given."""
    if spec == "none":
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise ValueError(f"class_weights must be 'none', 'balanced' or {len(LABELS)} floats, not {spec!r}")
        counts = np.bincount(labels, minlength=len(LABELS)).astype(np.float64)
        inverse = 1.0 / np.maximum(counts, 1.0)
        weights = inverse / inverse.mean()
    else:
        if len(spec) != len(LABELS) or any(w < 0 for w in spec):
            raise ValueError(f"class_weights needs {len(LABELS)} non-negative floats ({', '.join(LABELS)}), got {spec}")
        weights = np.asarray(spec, dtype=np.float64)
    return torch.tensor(weights, dtype=torch.float32)


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


def soft_targets(labels: np.ndarray, agreement: np.ndarray) -> np.ndarray:
    """One target distribution per row: the label gets the row's annotator
    agreement (percent, at least 1/num_labels), the other labels share the rest evenly."""
    num_labels = len(LABELS)
    share = np.clip(np.asarray(agreement, dtype=np.float64) / 100.0, 1.0 / num_labels, 1.0)
    targets = np.repeat(((1.0 - share) / (num_labels - 1))[:, None], num_labels, axis=1)
    targets[np.arange(len(labels)), labels] = share
    return targets.astype(np.float32)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy against label ids, or against target distributions
    when ``labels`` is a float [batch, num_labels] tensor; class weights scale each row's term."""
    logits = logits.float().view(-1, logits.shape[-1])
    weights = None if class_weights is None else class_weights.to(logits.device)
    if not labels.dtype.is_floating_point:
        return F.cross_entropy(logits, labels.view(-1), weight=weights, label_smoothing=label_smoothing)
    targets = labels.view(logits.shape)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    per_row = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    if weights is None:
        return per_row.mean()
    row_weights = targets @ weights
    return (per_row * row_weights).sum() / row_weights.sum()


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of (KL(p_a || p_b) + KL(p_b || p_a)) / 2: R-Drop's consistency term."""
    log_a, log_b = F.log_softmax(logits_a.float(), dim=-1), F.log_softmax(logits_b.float(), dim=-1)
    kl_ab = F.kl_div(log_b, log_a, log_target=True, reduction="batchmean")
    kl_ba = F.kl_div(log_a, log_b, log_target=True, reduction="batchmean")
    return (kl_ab + kl_ba) / 2


class WeightAverageCallback(TrainerCallback):
    """Keeps an exponential moving average of the weights (``torch.optim.swa_utils``),
    updated after every optimizer step. Evaluation and checkpoints see the average:
    it is swapped into the model when the Trainer is about to evaluate or save, and
    the live weights are swapped back before the next step, so training itself
    follows the live weights. The best checkpoint the Trainer loads at the end is
    therefore an averaged one. Each checkpoint also keeps the live weights
    (``LIVE_WEIGHTS``), so that a resumed run trains on from them, not from the average."""

    LIVE_WEIGHTS = "live_weights.safetensors"

    def __init__(self, decay: float):
        self.decay = decay
        self.average: torch.optim.swa_utils.AveragedModel | None = None
        self._live: list[torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import load_file
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay))
        if state.global_step > 0:
            # Resumed: the model holds the checkpoint's weights, the average (swapped in to save).
            self.average.n_averaged.fill_(state.global_step)
            live = load_file(Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.LIVE_WEIGHTS)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(live[name])

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # Called before every step's first forward pass, the first of an epoch included.
        self._restore_live(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.average.update_parameters(model)
        self._use_average_if_needed(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._use_average_if_needed(args, state, control, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The model now holds the averaged weights (or the best averaged checkpoint); keep them.
        self._live = None

    def _use_average_if_needed(self, args, state, control, model) -> None:
        if not (control.should_evaluate or control.should_save):
            return
        params = list(model.parameters())
        if self._live is None:
            self._live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for param, averaged in zip(params, self.average.module.parameters()):
                    param.copy_(averaged)
        if control.should_save and state.is_world_process_zero:
            # Into the checkpoint's folder before the Trainer writes it: its state file, written last,
            # then marks a checkpoint complete only with the live weights in it.
            from safetensors.torch import save_file

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            names = [name for name, _ in model.named_parameters()]
            save_file({name: live.to("cpu").contiguous() for name, live in zip(names, self._live)},
                      folder / self.LIVE_WEIGHTS)

    def _restore_live(self, model) -> None:
        if self._live is None:
            return
        with torch.no_grad():
            for param, live in zip(model.parameters(), self._live):
                param.copy_(live)
        self._live = None


class FinetuneTrainer(Trainer):
    """Trainer with class weights, label smoothing or soft targets in the loss,
    R-Drop, layer-wise learning-rate decay, and a moving average of the weights."""

    def __init__(
        self, *args, class_weights: torch.Tensor | None = None, layer_lr_decay: float = 1.0,
        label_smoothing: float = 0.0, rdrop_alpha: float = 0.0, ema_decay: float = 0.0, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if ema_decay:
            self.add_callback(WeightAverageCallback(ema_decay))
        self.class_weights = class_weights
        self.layer_lr_decay = layer_lr_decay
        self.label_smoothing = label_smoothing
        self.rdrop_alpha = rdrop_alpha
        # Sequence classifiers take **kwargs but their loss is a per-batch mean that ignores
        # num_items_in_batch; left True, the Trainer multiplies it by the number of DDP processes.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        features = {key: value for key, value in inputs.items() if key != "labels"}
        if self.rdrop_alpha and model.training:
            return self._rdrop_loss(model, features, labels, return_outputs)
        outputs = model(**features)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = classification_loss(logits, labels, self.class_weights, self.label_smoothing)
        return (loss, outputs) if return_outputs else loss

    def _rdrop_loss(self, model, features: dict, labels: torch.Tensor, return_outputs: bool):
        """R-Drop (Liang et al., 2021): the batch runs twice under different dropout
        masks, in one forward pass over the batch stacked on itself; the loss is both
        passes' cross-entropy plus ``rdrop_alpha`` times their symmetric KL divergence."""
        outputs = model(**{key: torch.cat([value, value]) for key, value in features.items()})
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        first, second = logits.chunk(2)
        loss = classification_loss(logits, torch.cat([labels, labels]), self.class_weights, self.label_smoothing)
        loss = loss + self.rdrop_alpha * symmetric_kl(first, second)
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

"""Masked-LM domain adaptation, measured by held-out perplexity and kept only
when it beats the base.

* Texts are packed into full ``mlm_block_size`` blocks and masked with BERT's
  80/10/10 scheme at ``mlm_probability``. A BERT or MPNet base trains the packed
  models of :mod:`pipeline.train.fast_mlm`: exactly ``round(mlm_probability *
  block)`` predictions per block and the vocabulary head on those positions only.
* A base that ships without a masked-LM head (sentence-transformers models, the
  default MiniLM among them) gets a new random head on load, and the perplexity of
  a random head says nothing of the base. The new head is first trained alone
  (``mlm_head_steps``, the rest of the model frozen), the base's perplexity is
  measured with that head, and adaptation continues from there: the gate then
  compares the base's encoder with the adapted one.
* Checkpoints every ``checkpoint_steps`` steps under ``out_dir/checkpoints``; a
  second call with the same ``out_dir`` and settings resumes from the last complete
  one, masking each batch as the uncut run would have.
* On a GPU: bf16 autocast, fused AdamW, ``torch.compile``, and under compile
  attention with dropout as one replayed op that keeps SDPA's fused kernel.

Validation perplexity uses token-level masks from a fixed seed: base and adapted
model see the same masks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.train.checkpoints import CHECKPOINTS, mlm_fingerprint, prepare_checkpoint_dir
from pipeline.train.device import training_device_args
from pipeline.train.fast_mlm import (
    PACKED_MLM_CLASSES,
    StaticMaskCollator,
    keep_attention_in_bf16,
    num_predictions,
    replays_attention,
    use_replayed_attention,
)
from pipeline.train.masking import NumberedBatchMasks, group_texts, make_mlm_collator

log = logging.getLogger(__name__)

HEAD_FIT = "head-fit"  # inside the checkpoint folder: a retry reuses it, changed settings discard it
# Head-only training of a base without a masked-LM head: 40 steps at 3e-3 reach MiniLM's
# perplexity 1,379 against 1,638 at 1e-3 (bench/RESULTS.md, the masked-LM gate).
HEAD_LEARNING_RATE = 3e-3


@dataclass
class MlmResult:
    perplexity_base: float
    perplexity_adapted: float | None
    used: str  # "adapted" or "base"
    reason: str
    model_dir: str
    steps: int
    blocks: int  # packed training blocks
    resumed_from_step: int = 0  # 0: trained from step 0
    steps_run: int = 0  # optimizer steps taken by this call (steps - resumed_from_step when it finishes)
    checkpoint_dir: str | None = None
    history: list[dict] = field(default_factory=list)  # the Trainer's log_history, across resumes
    head_fit_steps: int = 0  # steps of head-only training before perplexity_base (a base without a masked-LM head)
    perplexity_random_head: float | None = None  # the base with its new, untrained head, when it had none

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- perplexity


@torch.no_grad()
def mlm_perplexity(model, tokenizer, texts: list[str], cfg: TrainConfig, batch_size: int = 32) -> float:
    """exp(mean masked-token loss) with a fixed masking seed, so two models see the same masks."""
    collator = make_mlm_collator(tokenizer, cfg.mlm_probability, seed=cfg.seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], truncation=True, max_length=cfg.max_length)
        batch = collator([{"input_ids": ids} for ids in encoded["input_ids"]])
        labels = batch["labels"].to(device)
        masked = int((labels != -100).sum())
        if masked == 0:
            continue
        output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        logits = output.logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += masked
    model.train(was_training)
    return math.exp(total_loss / max(total_tokens, 1))


# ---------------------------------------------------------------- models


def _load_model(cls, path: str, **kwargs):
    """fp32 master weights (transformers 5 loads a checkpoint's own dtype by
    default) with PyTorch's fused scaled-dot-product attention."""
    try:
        return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as error:  # an architecture without SDPA support
        log.info("SDPA attention not available for %s (%s); using the default", path, error)
        return cls.from_pretrained(path, dtype=torch.float32, **kwargs)


def _load_base(cls, path: str):
    """The model and the names of its parameters that ``path`` lacked, initialised
    anew on load: the masked-LM head of a base saved without one."""
    model, info = _load_model(cls, path, output_loading_info=True)
    missing = set(info["missing_keys"])
    return model, sorted(name for name, _ in model.named_parameters() if name in missing)


def _masked_lm_head_prefix(model) -> str:
    """The name prefix of the module that holds the vocabulary projection: ``cls.predictions.``
    for BERT, ``lm_head.`` for MPNet."""
    decoder = model.get_output_embeddings()
    name = next(name for name, module in model.named_modules() if module is decoder)
    return name.rpartition(".")[0] + "."


def fit_new_head(model, new_parameters: list[str], train_dataset, collator, eval_texts: list[str], tokenizer,
                 cfg: TrainConfig, folder: Path, steps: int) -> float:
    """Trains only ``new_parameters`` (a head the base lacked) for ``steps`` steps, every
    other parameter frozen, and returns the validation perplexity with that head. The
    head's weights and perplexity are kept in ``folder``; a second call loads them."""
    from safetensors.torch import load_file, save_file
    from transformers import Trainer

    record = folder / "head-fit.json"
    if record.is_file():
        model.load_state_dict(load_file(folder / "head.safetensors"), strict=False)
        log.info("masked-LM head fitted earlier: %s", record)
        return json.loads(record.read_text())["perplexity"]
    trainable = set(new_parameters)
    frozen = [p for name, p in model.named_parameters() if name not in trainable and p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    log.info("fitting the base's new masked-LM head (%d tensors) for %d steps, the rest frozen", len(trainable), steps)
    # No compile: the frozen encoder runs forward only, and the full run compiles afresh anyway.
    args = mlm_training_arguments(cfg, folder / "trainer", max_steps=steps, learning_rate=HEAD_LEARNING_RATE,
                                  save_strategy="no", torch_compile=False)
    try:
        Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator).train()
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    perplexity = mlm_perplexity(model, tokenizer, eval_texts, cfg)
    if args.should_save:
        shutil.rmtree(folder / "trainer", ignore_errors=True)
        state = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if name in trainable}
        save_file(state, folder / "head.safetensors")
        partial = record.with_suffix(".partial")
        partial.write_text(json.dumps({"steps": steps, "perplexity": perplexity, "parameters": sorted(trainable)}))
        partial.rename(record)  # last, so a kill never leaves a record without its weights
    return perplexity


def _packed_collator(model, tokenizer, blocks: list[list[int]], cfg: TrainConfig) -> StaticMaskCollator | None:
    """The static-k collator when the model has the masked-positions loss and every block
    has k maskable tokens; None (the Hugging Face collator) otherwise."""
    if type(model) not in PACKED_MLM_CLASSES.values():
        return None
    collator = StaticMaskCollator(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids, rate=cfg.mlm_probability)
    k = num_predictions(len(blocks[0]), cfg.mlm_probability)
    if int(collator.maskable(torch.tensor(blocks)).sum(dim=1).min()) < k:
        log.info("a block has fewer than %d maskable tokens: masking each token with probability %.2f instead", k, cfg.mlm_probability)
        return None
    return collator


def _name_transformers_architecture(folder: Path, model) -> None:
    """A saved packed model names transformers' own class in config.json, so the folder
    reads as an ordinary checkpoint of that architecture (the weights are the same)."""
    if type(model) not in PACKED_MLM_CLASSES.values():
        return
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [type(model).__bases__[-1].__name__]  # e.g. BertForMaskedLM
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def mlm_training_arguments(cfg: TrainConfig, output_dir: Path, **overrides):
    """The masked-LM run's TrainingArguments (bench/train_throughput.py times a Trainer with
    these). On a CUDA device with bf16 this also keeps math-path attention in bf16."""
    from transformers import TrainingArguments

    device = training_device_args(cfg)
    if device["bf16"] and torch.cuda.is_available():
        keep_attention_in_bf16()
    save = cfg.checkpoint_steps > 0
    return TrainingArguments(**{
        "output_dir": str(output_dir), "max_steps": cfg.mlm_steps, "per_device_train_batch_size": cfg.mlm_batch_size,
        "learning_rate": cfg.mlm_learning_rate, "warmup_steps": cfg.warmup_ratio, "weight_decay": cfg.weight_decay,
        "save_strategy": "steps" if save else "no", "save_steps": max(cfg.checkpoint_steps, 1), "save_total_limit": 2,
        "logging_steps": max(1, min(cfg.mlm_steps // 20, 100)), "report_to": "none", "seed": cfg.seed,
        "disable_tqdm": False,
        # The NaN filter reads every step's loss on the host, a device sync per step; a NaN
        # shows in the logged loss instead.
        "logging_nan_inf_filter": False,
        **device, **overrides,
    })


@functools.cache
def _step_counter_class():
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        """Counts the optimizer steps this process actually takes."""

        def __init__(self):
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return StepCounter


# ---------------------------------------------------------------- entry point


def adapt_mlm(base_model: str, corpus_texts: list[str], eval_texts: list[str], out_dir: Path, cfg: TrainConfig) -> MlmResult:
    """Continues masked-LM training of ``base_model`` on ``corpus_texts``; keeps
    the trained weights only if validation perplexity on ``eval_texts`` improves
    by ``cfg.mlm_margin``. Resumes from ``out_dir/checkpoints`` when a previous
    call with the same settings was cut off."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, Trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out_dir / CHECKPOINTS
    resumed_step, checkpoint = prepare_checkpoint_dir(checkpoint_dir, mlm_fingerprint(base_model, corpus_texts, cfg))
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model_type = AutoConfig.from_pretrained(base_model).model_type
    model, missing = _load_base(PACKED_MLM_CLASSES.get(model_type, AutoModelForMaskedLM), base_model)
    new_head = [name for name in missing if name.startswith(_masked_lm_head_prefix(model))]
    if new_head:
        log.info("%s has no masked-LM head; new on load: %s", base_model, ", ".join(new_head))
    perplexity_base = mlm_perplexity(model, tokenizer, eval_texts, cfg)
    base_what = "base"
    if cfg.mlm_steps <= 0:
        return MlmResult(perplexity_base, None, "base", "masked-LM adaptation disabled (mlm_steps=0)", base_model, 0, 0)

    block_size = cfg.mlm_block_size
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and block_size > max_positions:
        log.warning("mlm_block_size %d exceeds the model's %d positions: using %d", block_size, max_positions, max_positions)
        block_size = max_positions
    # Whole texts on purpose: group_texts cuts them into full blocks afterwards.
    ids = tokenizer(corpus_texts, truncation=False, add_special_tokens=True, verbose=False)["input_ids"] if corpus_texts else []
    blocks = group_texts(ids, block_size)
    if not blocks:
        reason = f"corpus too small for one {block_size}-token block; fine-tuning the base"
        return MlmResult(perplexity_base, None, "base", reason, base_model, 0, 0)

    collator = _packed_collator(model, tokenizer, blocks, cfg) or make_mlm_collator(tokenizer, cfg.mlm_probability)
    collator = NumberedBatchMasks(collator, cfg.seed)  # so that a resumed run masks as an uncut one
    train_dataset = Dataset.from_dict({"input_ids": blocks})
    head_steps, perplexity_random_head = 0, None
    if new_head:
        head_steps = cfg.mlm_steps if cfg.mlm_head_steps is None else cfg.mlm_head_steps
        base_what = "base with a random masked-LM head"
    if head_steps:
        perplexity_random_head = perplexity_base
        perplexity_base = fit_new_head(model, new_head, train_dataset, collator, eval_texts, tokenizer, cfg,
                                       checkpoint_dir / HEAD_FIT, head_steps)
        base_what = f"base with its new masked-LM head fitted {head_steps} steps"
        log.info("validation perplexity of the base: %.2f with a random head, %.2f with the fitted head",
                 perplexity_random_head, perplexity_base)
    save = cfg.checkpoint_steps > 0
    args = mlm_training_arguments(cfg, checkpoint_dir)
    if not save:
        resumed_step, checkpoint = 0, None
    if checkpoint is not None and resumed_step >= cfg.mlm_steps:
        # Trainer would take one step more when resumed at max_steps: take the
        # finished weights and history from the last checkpoint instead.
        log.info("masked-LM training already finished at %s (step %d): nothing to resume", checkpoint, resumed_step)
        model = _load_model(type(model), str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        history, global_step, steps_run = state["log_history"], state["global_step"], 0
        save_model = functools.partial(model.save_pretrained, is_main_process=args.should_save)
    else:
        replayed = replays_attention(model, compiled_on_gpu=args.torch_compile and torch.cuda.is_available())
        if replayed:
            own_attention = model.config._attn_implementation
            use_replayed_attention(model)
            log.info("masked-LM training with replayed attention (a fused kernel with dropout under torch.compile)")
        counter = _step_counter_class()()
        trainer = Trainer(
            model=model, args=args, train_dataset=train_dataset, callbacks=[counter], data_collator=collator,
        )
        if checkpoint is not None:
            log.info("resuming masked-LM training from %s (step %d of %d)", checkpoint, resumed_step, cfg.mlm_steps)
        else:
            log.info("masked-LM training from step 0: %d blocks of %d tokens", len(blocks), block_size)
        collator.next_batch = resumed_step * args.gradient_accumulation_steps  # the head's fit counted its own
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        model, save_model = trainer.model, trainer.save_model
        if replayed:
            model.set_attn_implementation(own_attention)  # a function registered in this process only
        history, global_step, steps_run = trainer.state.log_history, trainer.state.global_step, counter.steps
    perplexity_adapted = mlm_perplexity(model, tokenizer, eval_texts, cfg)
    common = {
        "head_fit_steps": head_steps, "perplexity_random_head": perplexity_random_head,
        "resumed_from_step": resumed_step, "steps_run": steps_run,
        "history": json.loads(json.dumps(history, default=float)), "checkpoint_dir": str(checkpoint_dir) if save else None,
    }
    adapted_dir = out_dir / "model"
    # Under torchrun only the main process writes the folder (every process reaches the same
    # verdict: same weights, same validation texts and masks); the others wait for it.
    main_process = args.should_save
    if main_process:
        shutil.rmtree(adapted_dir, ignore_errors=True)  # a retried call writes it afresh, or not at all
    if perplexity_adapted < perplexity_base * (1 - cfg.mlm_margin):
        save_model(str(adapted_dir))
        if main_process:
            _name_transformers_architecture(adapted_dir, model)
            tokenizer.save_pretrained(adapted_dir)
        used, model_dir = "adapted", str(adapted_dir)
        reason = f"validation perplexity {perplexity_base:.2f} ({base_what}) -> {perplexity_adapted:.2f}"
    else:
        used, model_dir = "base", base_model
        reason = (
            f"adapted perplexity {perplexity_adapted:.2f} does not beat the {base_what}'s {perplexity_base:.2f} "
            f"by the margin {cfg.mlm_margin:.0%}; fine-tuning the {base_what}"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return MlmResult(perplexity_base, perplexity_adapted, used, reason, model_dir, global_step, len(blocks), **common)

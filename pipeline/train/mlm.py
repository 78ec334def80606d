"""Masked-LM domain adaptation, measured by held-out perplexity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.config import TrainConfig


@dataclass
class MlmResult:
    perplexity_base: float
    perplexity_adapted: float | None
    used: str  # "adapted" or "base"
    reason: str
    model_dir: str
    steps: int
    blocks: int

    def to_dict(self) -> dict:
        return asdict(self)


def group_texts(token_lists: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenates tokenised texts and cuts them into full blocks: no padding."""
    flat = [token for tokens in token_lists for token in tokens]
    usable = len(flat) // block_size * block_size
    return [flat[i : i + block_size] for i in range(0, usable, block_size)]


@torch.no_grad()
def mlm_perplexity(model, tokenizer, texts: list[str], cfg: TrainConfig, batch_size: int = 32) -> float:
    """exp(mean masked-token loss) with a fixed masking seed, so two models see the same masks."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_probability, seed=cfg.seed)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], truncation=True, max_length=cfg.max_length)
        features = [{"input_ids": ids} for ids in encoded["input_ids"]]
        batch = collator(features)
        masked = int((batch["labels"] != -100).sum())
        if masked == 0:
            continue
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        total_loss += float(output.loss) * masked
        total_tokens += masked
    return math.exp(total_loss / max(total_tokens, 1))


def adapt_mlm(base_model: str, corpus_texts: list[str], eval_texts: list[str], out_dir: Path, cfg: TrainConfig) -> MlmResult:
    """Continues masked-LM training of ``base_model`` on ``corpus_texts``; keeps
    the adapted weights only if validation perplexity improves by ``cfg.mlm_margin``."""
    from datasets import Dataset
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForMaskedLM.from_pretrained(base_model)
    perplexity_base = mlm_perplexity(model, tokenizer, eval_texts, cfg)
    if cfg.mlm_steps <= 0:
        return MlmResult(perplexity_base, None, "base", "masked-LM adaptation disabled (mlm_steps=0)", base_model, 0, 0)

    # Whole texts on purpose: group_texts cuts them into blocks afterwards.
    encoded = tokenizer(corpus_texts, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    blocks = group_texts(encoded, cfg.mlm_block_size)
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), max_steps=cfg.mlm_steps, per_device_train_batch_size=cfg.mlm_batch_size,
        learning_rate=cfg.mlm_learning_rate, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        save_strategy="no", logging_steps=max(cfg.mlm_steps // 5, 1), report_to="none", seed=cfg.seed,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks}),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_probability, seed=cfg.seed),
    )
    trainer.train()
    perplexity_adapted = mlm_perplexity(model, tokenizer, eval_texts, cfg)
    adapted_dir = out_dir / "model"
    if perplexity_adapted < perplexity_base * (1 - cfg.mlm_margin):
        trainer.save_model(str(adapted_dir))
        tokenizer.save_pretrained(adapted_dir)
        used, model_dir = "adapted", str(adapted_dir)
        reason = f"validation perplexity {perplexity_base:.2f} -> {perplexity_adapted:.2f}"
    else:
        used, model_dir = "base", base_model
        reason = (
            f"adapted perplexity {perplexity_adapted:.2f} does not beat base {perplexity_base:.2f} "
            f"by the margin {cfg.mlm_margin:.0%}; fine-tuning the base"
        )
    return MlmResult(perplexity_base, perplexity_adapted, used, reason, model_dir, cfg.mlm_steps, len(blocks))

"""Masked-LM adaptation: BERT's 80/10/10 masking, the packed masked-positions
step, replayed attention, the device switches and the perplexity margin gate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.train.masking import make_mlm_collator
from pipeline.train.mlm import adapt_mlm, mlm_perplexity
from tests.conftest import tiny_train_config


@pytest.fixture(scope="module")
def texts(fpb_subset) -> list[str]:
    from pipeline.data.sources import read_phrasebank

    raw, _ = read_phrasebank(fpb_subset)
    return raw.loc[raw["error"].isna(), "text"].tolist()


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def corpus_and_validation(texts: list[str]) -> tuple[list[str], list[str]]:
    """Documents of five consecutive sentences and held-out validation sentences that are not in them."""
    corpus, validation = texts[:-40], texts[-40:]
    return [" ".join(corpus[i : i + 5]) for i in range(0, len(corpus), 5)], validation


@pytest.mark.parametrize("probability", [0.15, 0.3])
def test_masking_picks_the_share_and_splits_80_10_10(tokenizer, probability):
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(1)
    original = ordinary[torch.randint(len(ordinary), (128, 512), generator=generator)]
    collator = make_mlm_collator(tokenizer, probability, seed=0)
    batch = collator([{"input_ids": row.tolist()} for row in original])
    picked = batch["labels"] != -100
    n = int(picked.sum())
    assert abs(n / original.numel() - probability) < 0.01
    assert torch.equal(batch["labels"][picked], original[picked])
    assert torch.equal(batch["input_ids"][~picked], original[~picked])  # untouched outside the picked tokens
    inputs = batch["input_ids"][picked]
    to_mask = float((inputs == tokenizer.mask_token_id).sum()) / n
    kept = float((inputs == original[picked]).sum()) / n
    randomised = float(((inputs != tokenizer.mask_token_id) & (inputs != original[picked])).sum()) / n
    # About 9,800 (0.15) or 19,700 (0.3) picked tokens: one standard error of the 80 % share is 0.004 or less.
    assert abs(to_mask - 0.8) < 0.015
    assert abs(kept - 0.1) < 0.012  # a random token equal to the original (1/1500) counts as kept
    assert abs(randomised - 0.1) < 0.012


def test_margin_gate_keeps_the_base_and_says_why(tmp_path, tiny_base, texts):
    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={"mlm_steps": 3, "mlm_margin": 0.99})
    result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert result.used == "base" and result.model_dir == str(tiny_base)
    assert "does not beat" in result.reason and "99%" in result.reason
    assert not (tmp_path / "model").exists()
    assert result.to_dict()["perplexity_adapted"] == result.perplexity_adapted


def test_device_switches_follow_the_machine_and_bf16_on_a_cpu_only_when_asked(monkeypatch, tiny_base):
    from pipeline.train.device import training_device_args

    cfg = tiny_train_config(tiny_base).model_copy(update={"bf16": True, "torch_compile": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # On a CPU, bf16 autocast only when asked for in so many words; compile stays a GPU switch.
    assert training_device_args(cfg) == {
        "bf16": True, "optim": "adamw_torch", "torch_compile": False, "dataloader_pin_memory": False, "use_cpu": True,
    }
    assert training_device_args(cfg.model_copy(update={"bf16": None}))["bf16"] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert training_device_args(cfg) == {
        "bf16": True, "optim": "adamw_torch_fused", "torch_compile": True, "dataloader_pin_memory": True, "use_cpu": False,
        "accelerator_config": {"non_blocking": True},
    }
    auto = cfg.model_copy(update={"bf16": None, "torch_compile": False})
    assert training_device_args(auto)["bf16"] is True and training_device_args(auto)["torch_compile"] is False
    off = cfg.model_copy(update={"bf16": False})
    assert training_device_args(off)["bf16"] is False


@pytest.mark.parametrize(("probability", "packed"), [(0.15, True), (0.95, False)])
def test_packed_token_masking_takes_the_masked_positions_step(monkeypatch, tmp_path, tiny_base, texts, probability, packed):
    """Token masking of packed blocks trains with k static predictions per block and the head on
    those positions only; blocks with fewer than k maskable tokens (k = round(0.95 x 16) = 15 here, and a
    text boundary brings two specials) fall back to Hugging Face's collator and full-head loss."""
    from transformers import AutoModelForMaskedLM, Trainer

    from pipeline.train.fast_mlm import PackedBertForMaskedLM

    seen = []
    training_step = Trainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        seen.append((type(self.accelerator.unwrap_model(model)), {name: tuple(t.shape) for name, t in inputs.items()}))
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recording_step)
    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={
        "mlm_steps": 3, "mlm_margin": -1.0, "mlm_block_size": 16, "mlm_probability": probability, "checkpoint_steps": 0,
        "mlm_learning_rate": 1e-3,
    })
    result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert len(seen) == 3 and all(cls is PackedBertForMaskedLM for cls, _ in seen)
    shapes = seen[0][1]
    if packed:
        assert shapes == {"input_ids": (8, 16), "masked_positions": (8, 2), "masked_labels": (8, 2)}
    else:
        assert set(shapes) == {"input_ids", "attention_mask", "labels"}
    assert result.used == "adapted" and result.perplexity_adapted < result.perplexity_base  # it learned
    # The saved folder is an ordinary BertForMaskedLM checkpoint.
    model, info = AutoModelForMaskedLM.from_pretrained(result.model_dir, output_loading_info=True)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.architectures == ["BertForMaskedLM"]
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_replayed_attention_trains_masked_lm_and_saves_an_ordinary_checkpoint(tmp_path, tiny_base, texts, caplog,
                                                                              monkeypatch):
    """Where the replayed op is taken (compiled on a GPU; forced here) the model's attention runs
    through it while training, and an ordinary checkpoint is left behind."""
    from transformers import AutoModelForMaskedLM

    import pipeline.train.fast_mlm as fast_mlm
    import pipeline.train.mlm as mlm

    calls = []
    op = fast_mlm.dropout_attention
    monkeypatch.setattr(fast_mlm, "dropout_attention", lambda *args: calls.append(1) or op(*args))
    monkeypatch.setattr(mlm, "replays_attention", lambda model, compiled_on_gpu: True)
    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={
        "mlm_steps": 3, "mlm_margin": -1.0, "mlm_block_size": 32, "mlm_batch_size": 4, "checkpoint_steps": 0,
        "mlm_learning_rate": 1e-3,
    })
    with caplog.at_level("INFO", logger="pipeline.train.mlm"):
        result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert "replayed attention" in caplog.text
    assert len(calls) == 3 * 2  # every training step, every layer of the tiny BERT; none in evaluation
    assert result.used == "adapted" and result.perplexity_adapted < result.perplexity_base
    model = AutoModelForMaskedLM.from_pretrained(result.model_dir)
    assert mlm_perplexity(model, AutoTokenizer.from_pretrained(result.model_dir), validation, cfg) == pytest.approx(
        result.perplexity_adapted, rel=1e-6)



"""A base saved without a masked-LM head (as sentence-transformers models are,
the default MiniLM among them): its new head is fitted alone before the base's
perplexity is measured, so the gate compares encoders, not a random head."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.sources import read_phrasebank
from pipeline.train.fast_mlm import PackedBertForMaskedLM
from pipeline.train.mlm import HEAD_FIT, CHECKPOINTS, _load_base, adapt_mlm
from tests.conftest import tiny_train_config


@pytest.fixture(scope="module")
def texts(fpb_subset) -> list[str]:
    raw, _ = read_phrasebank(fpb_subset)
    return raw.loc[raw["error"].isna(), "text"].tolist()


def config(base, **updates):
    return tiny_train_config(base).model_copy(update={"mlm_steps": 6, "checkpoint_steps": 0, **updates})


def test_the_new_head_is_found_on_load(headless_base, tiny_base):
    _, new = _load_base(PackedBertForMaskedLM, str(headless_base))
    assert new and all(name.startswith("cls.predictions.") for name in new)
    assert "cls.predictions.bias" in new and not any("word_embeddings" in name for name in new)  # the decoder is tied
    assert _load_base(PackedBertForMaskedLM, str(tiny_base))[1] == []


def test_a_headless_base_is_measured_with_its_head_fitted_and_only_the_head_trained(tmp_path, headless_base, texts):
    corpus, validation = texts[:-40], texts[-40:]
    result = adapt_mlm(str(headless_base), corpus, validation, tmp_path, config(headless_base))
    assert result.head_fit_steps == 6  # unset: as many as mlm_steps
    assert result.perplexity_base < result.perplexity_random_head  # the fitted head learned something
    assert "fitted 6 steps" in result.reason
    folder = tmp_path / CHECKPOINTS / HEAD_FIT
    record = json.loads((folder / "head-fit.json").read_text())
    assert record["perplexity"] == result.perplexity_base
    saved = load_file(folder / "head.safetensors")
    assert sorted(saved) == record["parameters"] and all(name.startswith("cls.predictions.") for name in saved)

    # The fit trained those tensors and nothing else: the encoder is the base's, bit for bit.
    fitted, _ = _load_base(PackedBertForMaskedLM, str(headless_base))
    before = {name: p.detach().clone() for name, p in fitted.named_parameters()}
    fitted.load_state_dict(saved, strict=False)
    fresh = dict(fitted.named_parameters())
    assert all(not torch.equal(before[name], fresh[name]) for name in saved)
    assert all(p.requires_grad for p in fresh.values())

    # A retried call takes the recorded fit instead of fitting again, and ends where the first did.
    stamp = (folder / "head-fit.json").stat().st_mtime_ns
    again = adapt_mlm(str(headless_base), corpus, validation, tmp_path, config(headless_base))
    assert (folder / "head-fit.json").stat().st_mtime_ns == stamp
    assert again.perplexity_base == result.perplexity_base
    assert again.perplexity_adapted == pytest.approx(result.perplexity_adapted, rel=1e-5)


def test_a_changed_head_setting_fits_the_head_again(tmp_path, headless_base, texts):
    corpus, validation = texts[:-40], texts[-40:]
    first = adapt_mlm(str(headless_base), corpus, validation, tmp_path, config(headless_base, mlm_head_steps=3))
    record = tmp_path / CHECKPOINTS / HEAD_FIT / "head-fit.json"
    assert json.loads(record.read_text())["steps"] == 3
    second = adapt_mlm(str(headless_base), corpus, validation, tmp_path, config(headless_base, mlm_head_steps=1))
    assert second.head_fit_steps == 1 and json.loads(record.read_text())["steps"] == 1
    # One step fits the head less than three: a stale fit reused would keep the first value.
    assert second.perplexity_base > first.perplexity_base
    assert json.loads(record.read_text())["perplexity"] == second.perplexity_base


def test_encoder_stays_frozen_during_the_head_fit(tmp_path, headless_base, texts, monkeypatch):
    """The encoder's weights after the fit, seen from inside the first Trainer's run."""
    from transformers import Trainer

    seen = []
    original = Trainer.train

    def train_and_record(self, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        output = original(self, *args, **kwargs)
        changed = {n for n, p in self.model.named_parameters() if not torch.equal(before[n], p)}
        seen.append((trainable, changed))
        return output

    monkeypatch.setattr(Trainer, "train", train_and_record)
    adapt_mlm(str(headless_base), texts[:-40], texts[-40:], tmp_path, config(headless_base))
    (head_trainable, head_changed), (full_trainable, full_changed) = seen
    assert head_trainable == head_changed and all(n.startswith("cls.predictions.") for n in head_trainable)
    assert any(n.startswith("bert.encoder.") for n in full_changed) and len(full_trainable) > len(head_trainable)


def test_no_head_steps_compares_against_the_random_head(tmp_path, headless_base, texts):
    result = adapt_mlm(str(headless_base), texts[:-40], texts[-40:], tmp_path, config(headless_base, mlm_head_steps=0))
    assert result.head_fit_steps == 0 and result.perplexity_random_head is None
    assert "random masked-LM head" in result.reason
    assert not (tmp_path / CHECKPOINTS / HEAD_FIT).exists()


def test_a_base_with_its_own_head_is_not_refitted(tmp_path, tiny_base, texts):
    result = adapt_mlm(str(tiny_base), texts[:-40], texts[-40:], tmp_path, config(tiny_base))
    assert result.head_fit_steps == 0 and result.perplexity_random_head is None
    assert not (tmp_path / CHECKPOINTS / HEAD_FIT).exists()



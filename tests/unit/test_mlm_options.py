"""Masked-LM options: BERT's 80/10/10 masking, whole-word masking, the
MLM+NSP objective, pretraining from scratch and the perplexity margin gate."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.train.masking import build_nsp_pairs, continuation_table, group_texts, make_mlm_collator, split_documents
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
    """Documents of five consecutive sentences (so that next-sentence pairs exist) and
    held-out validation sentences that are not in them."""
    corpus, validation = texts[:-40], texts[-40:]
    return [" ".join(corpus[i : i + 5]) for i in range(0, len(corpus), 5)], validation


def word_starts(ids: torch.Tensor, table: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """For each position the index of the start of its word (itself for a start)."""
    start = torch.arange(ids.shape[0])
    for k in range(1, ids.shape[0]):
        if table[ids[k]] and not special[k] and not special[k - 1]:
            start[k] = start[k - 1]
    return start


@pytest.mark.parametrize(("probability", "whole_word"), [(0.15, False), (0.3, False), (0.15, True)])
def test_masking_picks_the_share_and_splits_80_10_10(tokenizer, probability, whole_word):
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(1)
    original = ordinary[torch.randint(len(ordinary), (128, 512), generator=generator)]
    collator = make_mlm_collator(tokenizer, probability, whole_word=whole_word, seed=0)
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


def test_whole_word_masking_masks_all_pieces_of_a_word_or_none(tokenizer, texts):
    table = continuation_table(tokenizer)
    ids = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    blocks = group_texts(ids, 64)
    special_ids = torch.tensor(tokenizer.all_special_ids)

    def violations(whole_word: bool) -> tuple[int, int]:
        collator = make_mlm_collator(tokenizer, 0.15, whole_word=whole_word, seed=0)
        batch = collator([{"input_ids": block} for block in blocks])
        broken, multi_piece_masked = 0, 0
        for row, labels in zip(torch.tensor(blocks), batch["labels"]):
            masked = labels != -100
            starts = word_starts(row, table, torch.isin(row, special_ids))
            for k in range(len(row)):
                if starts[k] != k:  # a "##" piece
                    broken += int(masked[k] != masked[starts[k]])
                    multi_piece_masked += int(masked[k])
        return broken, multi_piece_masked

    broken, multi_piece_masked = violations(whole_word=True)
    assert broken == 0 and multi_piece_masked > 50
    # The check can fail: WordPiece-level masking splits words.
    assert violations(whole_word=False)[0] > 0


def test_next_sentence_pairs_are_half_actual_next_half_random():
    # Token ids tell document and position apart: document d, token t is 1000*d + t.
    rng = random.Random(0)
    documents = []
    for d in range(200):
        position, sentences = 0, []
        for _ in range(rng.randint(1, 6)):
            length = rng.randint(3, 20)
            sentences.append([1000 * (d + 1) + position + k for k in range(length)])
            position += length
        documents.append(sentences)
    pairs = build_nsp_pairs(documents, 29, random.Random(0))
    labels = [label for _, _, label in pairs]
    assert len(pairs) > 300 and 0.42 < sum(labels) / len(labels) < 0.58
    for a, b, label in pairs:
        assert a and b and len(a) + len(b) <= 29
        assert all(x + 1 == y for x, y in zip(a, a[1:]))
        same_document = a[0] // 1000 == b[0] // 1000
        if label == 0:  # B is exactly the segment that follows A
            assert same_document and a[-1] + 1 == b[0]
        else:
            assert not same_document
    # Single-sentence documents give actual-next pairs as well (split at a word start).
    single = build_nsp_pairs([[[1, 2, 3, 4]], [[11, 12, 13]]], 29, random.Random(3))
    assert any(label == 0 for _, _, label in single)


def test_sentence_documents_keep_text_boundaries(tokenizer):
    documents = split_documents(["Sales rose. Profit fell!  Outlook is weak.", "One sentence only"], tokenizer, 5)
    assert len(documents) == 2 and len(documents[0]) >= 3
    assert all(0 < len(sentence) <= 5 for document in documents for sentence in document)


def test_mlm_nsp_trains_and_gives_a_classifier_folder(tmp_path, tiny_base, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    corpus, validation = corpus_and_validation(texts)
    # Margin -1 accepts the adapted model unless its perplexity doubled: the folder is written.
    cfg = tiny_train_config(tiny_base).model_copy(
        update={"mlm_objective": "mlm+nsp", "mlm_steps": 6, "mlm_margin": -1.0, "mlm_learning_rate": 1e-3}
    )
    result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert result.objective == "mlm+nsp" and result.start == "continue" and result.used == "adapted"
    assert result.head_fit_steps == 0  # the base's masked-LM head is its own; only the NSP head is new
    assert result.blocks > 0 and result.steps == 6 and result.resumed_from_step == 0 and result.steps_run == 6
    assert math.isfinite(result.perplexity_base) and math.isfinite(result.perplexity_adapted)
    assert any("loss" in entry for entry in result.history)
    model, info = AutoModelForSequenceClassification.from_pretrained(result.model_dir, num_labels=3, output_loading_info=True)
    assert model.config.architectures == ["BertForPreTraining"]
    # Encoder and the NSP-trained pooler come from the folder; only the new head is fresh.
    assert all(key.startswith("classifier.") for key in info["missing_keys"])
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    logits = model(**tokenizer(["Profit rose.", "Sales fell sharply."], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 3)


def test_whole_word_mlm_trains(tmp_path, tiny_base, texts):
    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={"mlm_whole_word": True, "mlm_steps": 3})
    result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert result.whole_word and result.steps == 3 and math.isfinite(result.perplexity_adapted)


def test_scratch_start_trains_a_tokenizer_and_a_bert(tmp_path, tiny_base, texts):
    from transformers import AutoConfig, AutoTokenizer

    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={
        "base_model": "unused-with-scratch", "mlm_from_scratch": True, "scratch_vocab_size": 600,
        "scratch_hidden_size": 32, "scratch_layers": 1, "scratch_heads": 2, "mlm_block_size": 32,
        "mlm_steps": 20, "mlm_learning_rate": 2e-3,
    })
    result = adapt_mlm("unused-with-scratch", corpus, validation, tmp_path, cfg)
    assert result.start == "scratch"
    init = tmp_path / "scratch-init"
    assert len(AutoTokenizer.from_pretrained(init)) <= 600
    config = AutoConfig.from_pretrained(init)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 2)
    # The random init predicts about uniformly over the vocabulary; 20 steps learn at least word frequencies.
    assert result.perplexity_base > 100
    assert result.perplexity_adapted < result.perplexity_base
    assert result.used == "adapted" and "random init" in result.reason
    assert AutoConfig.from_pretrained(result.model_dir).hidden_size == 32


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
    assert "torch_compile_mode" not in training_device_args(cfg.model_copy(update={"torch_compile_mode": "max-autotune"}))
    assert training_device_args(cfg.model_copy(update={"bf16": None}))["bf16"] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert training_device_args(cfg) == {
        "bf16": True, "optim": "adamw_torch_fused", "torch_compile": True, "dataloader_pin_memory": True, "use_cpu": False,
        "accelerator_config": {"non_blocking": True},
    }
    graphs = cfg.model_copy(update={"torch_compile_mode": "reduce-overhead"})
    assert training_device_args(graphs)["torch_compile_mode"] == "reduce-overhead"
    assert "torch_compile_mode" not in training_device_args(graphs.model_copy(update={"torch_compile": False}))
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
    import pipeline.train.fast_mlm as fast_mlm

    sparse_layers = []
    layer_at = fast_mlm.bert_layer
    monkeypatch.setattr(fast_mlm, "bert_layer", lambda *args, **kwargs: sparse_layers.append(1) or layer_at(*args, **kwargs))
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
        assert len(sparse_layers) == 3  # mlm_sparse_last_layer: the last layer on the masked rows, every step
    else:
        assert set(shapes) == {"input_ids", "attention_mask", "labels"}
        assert not sparse_layers
    assert result.used == "adapted" and result.perplexity_adapted < result.perplexity_base  # it learned
    # The saved folder is an ordinary BertForMaskedLM checkpoint.
    model, info = AutoModelForMaskedLM.from_pretrained(result.model_dir, output_loading_info=True)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.architectures == ["BertForMaskedLM"]
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_float8_masked_lm_trains_and_saves_a_full_precision_checkpoint(tmp_path, tiny_base, texts, caplog):
    """mlm_float8 trains the encoder's linear layers with float8 products (emulated on a CPU), saves
    a Trainer checkpoint on the way, and hands back an ordinary checkpoint: evaluated and saved in
    full precision."""
    from transformers import AutoModelForMaskedLM

    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={
        "mlm_steps": 3, "mlm_margin": -1.0, "mlm_block_size": 32, "mlm_batch_size": 4, "checkpoint_steps": 2,
        "mlm_learning_rate": 1e-3, "mlm_float8": True,
    })
    with caplog.at_level("INFO", logger="pipeline.train.mlm"):
        result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert "float8 products in 12 linear layers" in caplog.text  # 2 layers of the tiny BERT
    assert result.used == "adapted" and result.perplexity_adapted < result.perplexity_base
    model, info = AutoModelForMaskedLM.from_pretrained(result.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert mlm_perplexity(model, AutoTokenizer.from_pretrained(result.model_dir), validation, cfg) == pytest.approx(
        result.perplexity_adapted, rel=1e-6)  # the perplexity reported is the saved model's


def test_bf16_residual_trains_with_a_bf16_stream_under_autocast_and_removes_its_hooks(tmp_path, tiny_base, texts,
                                                                                     monkeypatch, caplog):
    """mlm_bf16_residual under bf16 autocast (asked for on a CPU here): the layers take bf16 hidden
    states in every training step, the hooks are gone afterwards (evaluation and the saved model
    see the model as it was), and a checkpoint made with it does not resume a run without it."""
    import pipeline.train.mlm as mlm
    from pipeline.train.checkpoints import mlm_fingerprint

    streams, models = [], []
    install = mlm.residual_stream_in_autocast_dtype

    def recording_install(model):
        models.append(model)
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.register_forward_pre_hook(
                lambda _module, inputs: streams.append(inputs[0].dtype) if torch.is_grad_enabled() else None)
        return install(model)

    monkeypatch.setattr(mlm, "residual_stream_in_autocast_dtype", recording_install)
    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={
        "mlm_steps": 3, "mlm_margin": -1.0, "mlm_block_size": 32, "mlm_batch_size": 4, "checkpoint_steps": 0,
        "mlm_learning_rate": 1e-3, "bf16": True, "mlm_bf16_residual": True,
    })
    with caplog.at_level("INFO", logger="pipeline.train.mlm"):
        result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert "residual stream in bf16 (6 layer norms)" in caplog.text  # two a layer, the embeddings', the head's
    assert streams == [torch.bfloat16] * (3 * 2)  # every step, both layers of the tiny BERT
    assert not any(module._forward_hooks for module in models[0].modules() if isinstance(module, torch.nn.LayerNorm))
    assert result.used == "adapted" and result.perplexity_adapted < result.perplexity_base
    assert mlm_fingerprint(str(tiny_base), corpus, cfg) != mlm_fingerprint(str(tiny_base), corpus, cfg.model_copy(
        update={"mlm_bf16_residual": False}))


def test_replayed_attention_trains_masked_lm_and_saves_an_ordinary_checkpoint(tmp_path, tiny_base, texts, caplog,
                                                                              monkeypatch):
    """mlm_attention=replayed runs the model's attention through the replayed op while training
    (on a GPU, auto picks it under torch.compile) and leaves an ordinary checkpoint behind."""
    from transformers import AutoModelForMaskedLM

    import pipeline.train.fast_mlm as fast_mlm

    calls, sparse_layers = [], []
    op, layer_at = fast_mlm.dropout_attention, fast_mlm.bert_layer
    monkeypatch.setattr(fast_mlm, "dropout_attention", lambda *args: calls.append(1) or op(*args))
    monkeypatch.setattr(fast_mlm, "bert_layer", lambda *args, **kwargs: sparse_layers.append(1) or layer_at(*args, **kwargs))
    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={
        "mlm_steps": 3, "mlm_margin": -1.0, "mlm_block_size": 32, "mlm_batch_size": 4, "checkpoint_steps": 0,
        "mlm_learning_rate": 1e-3, "mlm_attention": "replayed", "mlm_sparse_last_layer": False,
    })
    with caplog.at_level("INFO", logger="pipeline.train.mlm"):
        result = adapt_mlm(str(tiny_base), corpus, validation, tmp_path, cfg)
    assert "replayed attention" in caplog.text
    assert len(calls) == 3 * 2  # every training step, every layer of the tiny BERT; none in evaluation
    assert not sparse_layers  # mlm_sparse_last_layer=false: every layer over every row
    assert result.used == "adapted" and result.perplexity_adapted < result.perplexity_base
    model = AutoModelForMaskedLM.from_pretrained(result.model_dir)
    assert mlm_perplexity(model, AutoTokenizer.from_pretrained(result.model_dir), validation, cfg) == pytest.approx(
        result.perplexity_adapted, rel=1e-6)


def test_mlm_dropout_zero_trains_as_a_model_without_dropout_and_saves_the_models_own(tmp_path, tiny_base, texts):
    """mlm_dropout=0 trains the tiny BERT (dropout 0.1) exactly as a copy of it configured without
    dropout trains; the saved model keeps its 0.1 for fine-tuning, and a checkpoint made with the
    option does not resume a run without it."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from pipeline.train.checkpoints import mlm_fingerprint

    no_dropout = tmp_path / "no-dropout-base"
    config = AutoConfig.from_pretrained(tiny_base)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    AutoModelForMaskedLM.from_pretrained(tiny_base, config=config).save_pretrained(no_dropout)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(no_dropout)

    corpus, validation = corpus_and_validation(texts)
    cfg = tiny_train_config(tiny_base).model_copy(update={
        "mlm_steps": 3, "mlm_margin": -1.0, "mlm_block_size": 32, "mlm_batch_size": 4, "checkpoint_steps": 0,
        "mlm_learning_rate": 1e-3,
    })
    option = adapt_mlm(str(tiny_base), corpus, validation, tmp_path / "option", cfg.model_copy(update={"mlm_dropout": 0.0}))
    configured = adapt_mlm(str(no_dropout), corpus, validation, tmp_path / "configured", cfg)
    own = adapt_mlm(str(tiny_base), corpus, validation, tmp_path / "own", cfg)
    assert option.perplexity_adapted == pytest.approx(configured.perplexity_adapted, rel=1e-6)
    assert own.perplexity_adapted != pytest.approx(option.perplexity_adapted, rel=1e-6)  # the model's own 0.1 trains otherwise
    saved = AutoConfig.from_pretrained(option.model_dir)
    assert saved.hidden_dropout_prob == saved.attention_probs_dropout_prob == 0.1
    assert "mlm_dropout" not in mlm_fingerprint(str(tiny_base), corpus, cfg)  # earlier checkpoints keep their fingerprint
    assert mlm_fingerprint(str(tiny_base), corpus, cfg) != mlm_fingerprint(str(tiny_base), corpus, cfg.model_copy(
        update={"mlm_dropout": 0.0}))

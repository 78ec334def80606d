"""Fine-tuning options on the tiny BERT: LoRA merged for export, class-weighted
loss, label smoothing and soft targets, R-Drop, layer-wise learning-rate decay, early
stopping, greedy weight soups, a moving average of the weights."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.ingest import load_split
from pipeline.train.classify import (
    apply_lora, average_state_dicts, build_trainer, count_parameters, finetune, load_classifier,
)
from pipeline.train.trainer import class_weight_vector, classification_loss, soft_targets, symmetric_kl


@pytest.fixture(scope="module")
def splits(ingested):
    # A slice of the train split keeps each fine-tuning run to a few seconds on 2 CPU cores.
    train = load_split(ingested.labeled_dir, "train").sample(n=96, random_state=0).reset_index(drop=True)
    return train, load_split(ingested.labeled_dir, "validation")


def _config(settings, **overrides):
    return settings.train.model_copy(update={"epochs": 1, **overrides})


def _lora_param_count(config, r: int) -> int:
    hidden, layers = config.hidden_size, config.num_hidden_layers
    # query and value of each layer get A (r x hidden) and B (hidden x r); the head is a full copy.
    return layers * 2 * (r * hidden + hidden * r) + hidden * 3 + 3


def test_lora_wraps_only_query_value_and_the_head(ingested):
    cfg = _config(ingested, finetune_method="lora", lora_r=4, lora_alpha=8)
    model, _ = load_classifier(cfg.base_model)
    total_before = count_parameters(model)[1]
    peft_model = apply_lora(model, cfg)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier.modules_to_save" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable if "lora_" in name} == {"query", "value"}
    assert count_parameters(peft_model)[0] == _lora_param_count(peft_model.config, 4)
    assert count_parameters(peft_model)[0] < total_before / 5


def test_merged_lora_model_gives_the_peft_models_logits(tmp_path, ingested, splits):
    from transformers import AutoModelForSequenceClassification

    cfg = _config(ingested, finetune_method="lora", lora_r=4, lora_alpha=8)
    model, tokenizer = load_classifier(cfg.base_model)
    peft_model = apply_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        # B starts at zero; random B makes the merge change the weights.
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(std=0.3)
    batch = tokenizer(splits[1]["text"].head(16).tolist(), truncation=True, max_length=64, padding=True, return_tensors="pt")
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**batch).logits
        peft_model.merge_and_unload().save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        after = reloaded(**batch).logits
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_lora_finetune_saves_a_plain_transformers_model(tmp_path, ingested, splits):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, set_seed

    cfg = _config(ingested, finetune_method="lora", lora_r=4, lora_alpha=8)
    result = finetune(cfg.base_model, *splits, tmp_path, cfg)
    merged = AutoModelForSequenceClassification.from_pretrained(result["model_dir"]).eval()
    assert result["trainable_params"] == _lora_param_count(merged.config, 4)
    assert not (Path(result["model_dir"]) / "adapter_config.json").exists()
    # The saved adapter on its (identically seeded) base gives the merged model's logits.
    set_seed(cfg.seed)
    base, tokenizer = load_classifier(cfg.base_model, cfg.pooling)
    adapted = PeftModel.from_pretrained(base, result["adapter_dir"]).eval()
    batch = tokenizer(splits[1]["text"].head(16).tolist(), truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-4)


def test_balanced_class_weights_are_inverse_frequencies_with_mean_one():
    labels = np.array([0] * 1 + [1] * 6 + [2] * 3)
    weights = class_weight_vector(labels, "balanced").numpy()
    inverse = np.array([1.0, 1 / 6, 1 / 3])
    np.testing.assert_allclose(weights, inverse / inverse.mean(), rtol=1e-6)
    assert weights.mean() == pytest.approx(1.0)
    assert class_weight_vector(labels, "none") is None
    np.testing.assert_allclose(class_weight_vector(labels, [0.5, 1.0, 2.0]).numpy(), [0.5, 1.0, 2.0])
    with pytest.raises(ValueError):
        class_weight_vector(labels, [1.0, 2.0])


def test_class_weights_change_the_loss_of_a_batch(tmp_path, ingested, splits):
    model, tokenizer = load_classifier(ingested.train.base_model)
    weights = [0.2, 1.0, 5.0]
    plain = build_trainer(model, tokenizer, *splits, tmp_path / "plain", _config(ingested))
    weighted = build_trainer(model, tokenizer, *splits, tmp_path / "weighted", _config(ingested, class_weights=weights))
    batch = next(iter(plain.get_eval_dataloader()))
    labels = batch["labels"]
    assert len(labels.unique()) > 1
    model.eval()
    with torch.no_grad():
        loss_plain = plain.compute_loss(model, dict(batch))
        loss_weighted = weighted.compute_loss(model, dict(batch))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    nll = -torch.log_softmax(logits, dim=-1)[torch.arange(len(labels)), labels]
    per_item = torch.tensor(weights)[labels]
    torch.testing.assert_close(loss_plain, nll.mean())
    torch.testing.assert_close(loss_weighted, (per_item * nll).sum() / per_item.sum())
    assert abs(loss_weighted.item() - loss_plain.item()) > 1e-3


def test_layer_wise_lr_decay_param_groups(tmp_path, ingested, splits):
    cfg = _config(ingested, layer_lr_decay=0.5, learning_rate=1e-3, weight_decay=0.01, pooling="cls")
    model, tokenizer = load_classifier(cfg.base_model)
    optimizer = build_trainer(model, tokenizer, *splits, tmp_path, cfg).create_optimizer()
    lr = {name: group["lr"] for group in optimizer.param_groups for name in group["names"]}
    wd = {name: group["weight_decay"] for group in optimizer.param_groups for name in group["names"]}
    assert sorted(lr) == sorted(name for name, _ in model.named_parameters())
    layers = model.config.num_hidden_layers
    assert lr["classifier.weight"] == lr["bert.pooler.dense.weight"] == pytest.approx(1e-3)
    for i in range(layers):
        for part in ("attention.self.query.weight", "output.dense.bias", "output.LayerNorm.weight"):
            assert lr[f"bert.encoder.layer.{i}.{part}"] == pytest.approx(1e-3 * 0.5 ** (layers - 1 - i))
    assert lr[f"bert.encoder.layer.{layers - 1}.attention.self.query.weight"] == pytest.approx(1e-3)
    assert lr["bert.embeddings.word_embeddings.weight"] == pytest.approx(1e-3 * 0.5**layers)
    assert wd["bert.encoder.layer.0.attention.self.query.weight"] == 0.01
    assert wd["bert.encoder.layer.0.attention.self.query.bias"] == 0.0
    assert wd["bert.encoder.layer.0.output.LayerNorm.weight"] == 0.0
    assert wd["bert.embeddings.LayerNorm.weight"] == 0.0


def test_early_stopping_stops_when_validation_macro_f1_does_not_improve(tmp_path, ingested, splits):
    # A learning rate of 0 keeps the validation metric flat; the weighted loss and LLRD paths run along.
    cfg = _config(ingested, epochs=4, learning_rate=0.0, early_stopping_patience=1, class_weights="balanced",
                  layer_lr_decay=0.8)
    result = finetune(cfg.base_model, *splits, tmp_path, cfg)
    assert result["stopped_early"] and result["epochs_run"] == 2
    assert result["best_epoch"] == 1
    assert len(result["class_weights"]) == 3 and np.mean(result["class_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert (Path(result["model_dir"]) / "config.json").is_file()


def test_soft_targets_give_the_label_its_agreement_share():
    targets = soft_targets(np.array([0, 1, 2, 1]), np.array([100, 75, 66, 50]))
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(targets[1], [0.125, 0.75, 0.125])
    np.testing.assert_allclose(targets[2], [0.17, 0.17, 0.66], rtol=1e-6)
    np.testing.assert_allclose(targets[3], [0.25, 0.5, 0.25])


def test_classification_loss_with_smoothing_and_soft_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    # One-hot targets as floats give the hard-label loss, with or without class weights and smoothing.
    torch.testing.assert_close(classification_loss(logits, one_hot), classification_loss(logits, labels))
    weights = torch.tensor([0.5, 1.0, 3.0])
    torch.testing.assert_close(classification_loss(logits, one_hot, weights), classification_loss(logits, labels, weights))
    smoothed = one_hot * 0.9 + 0.1 / 3
    torch.testing.assert_close(classification_loss(logits, labels, label_smoothing=0.1),
                               -(smoothed * log_probs).sum(-1).mean())
    soft = torch.tensor(soft_targets(labels.numpy(), np.array([100, 75, 66, 50, 50, 75])))
    torch.testing.assert_close(classification_loss(logits, soft), -(soft * log_probs).sum(-1).mean())
    assert abs(classification_loss(logits, soft).item() - classification_loss(logits, labels).item()) > 1e-3


def test_symmetric_kl_is_zero_for_equal_logits_and_symmetric():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(symmetric_kl(a, b), symmetric_kl(b, a))
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    by_hand = ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean() / 2
    torch.testing.assert_close(symmetric_kl(a, b), by_hand)


def test_rdrop_loss_is_two_dropout_passes_plus_their_divergence(tmp_path, ingested, splits):
    model, tokenizer = load_classifier(ingested.train.base_model)
    alpha = 0.7
    trainer = build_trainer(model, tokenizer, *splits, tmp_path, _config(ingested, rdrop_alpha=alpha))
    batch = dict(next(iter(trainer.get_train_dataloader())))
    features = {k: v for k, v in batch.items() if k != "labels"}
    model.train()
    torch.manual_seed(3)
    loss = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(3)
    first, second = model(**{k: torch.cat([v, v]) for k, v in features.items()}).logits.chunk(2)
    assert (first - second).abs().max() > 1e-4, "dropout gives the two passes different logits"
    expected = (classification_loss(first, batch["labels"]) + classification_loss(second, batch["labels"])) / 2
    torch.testing.assert_close(loss, expected + alpha * symmetric_kl(first, second))
    # Evaluation runs one pass, without the consistency term.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)),
                                   classification_loss(model(**features).logits, batch["labels"]))


def test_moving_average_is_what_is_validated_and_kept_while_training_follows_live_weights(tmp_path, ingested, splits):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.at_begin, self.at_end = [], []

        def _snapshot(self, model):
            return [p.detach().clone() for p in model.parameters()]

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.at_begin.append(self._snapshot(model))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.at_end.append(self._snapshot(model))

    decay = 0.8
    model, tokenizer = load_classifier(ingested.train.base_model)
    trainer = build_trainer(model, tokenizer, *splits, tmp_path, _config(ingested, epochs=2, ema_decay=decay))
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()

    steps = len(recorder.at_end)
    assert steps == 2 * len(trainer.get_train_dataloader())
    # Each step starts from the live weights the previous step ended with, across the epoch boundary too.
    for before, after in zip(recorder.at_begin[1:], recorder.at_end[:-1]):
        for a, b in zip(before, after):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = [p.clone() for p in recorder.at_end[0]]
    averages = []
    for snapshot in recorder.at_end[1:]:
        expected = [decay * e + (1 - decay) * s for e, s in zip(expected, snapshot)]
        averages.append(expected)
    evals = [h for h in trainer.state.log_history if "eval_macro_f1" in h]
    best_step = max(evals, key=lambda h: h["eval_macro_f1"])["step"]
    kept = list(trainer.model.parameters())
    for got, want in zip(kept, averages[best_step - 2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any((got - live).abs().max() > 1e-4 for got, live in zip(kept, recorder.at_end[best_step - 1]))


def test_agreement_soft_labels_reach_the_loss(tmp_path, ingested, splits):
    train = splits[0]
    assert set(train["agreement"]) > {100}
    model, tokenizer = load_classifier(ingested.train.base_model)
    trainer = build_trainer(model, tokenizer, train, splits[1], tmp_path, _config(ingested, agreement_soft_labels=True))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (len(batch["input_ids"]), 3)
    torch.testing.assert_close(batch["labels"].sum(-1), torch.ones(len(batch["labels"])))
    assert (batch["labels"].max(-1).values < 1).any()
    # Validation keeps hard labels, so its metrics score the majority label.
    assert not next(iter(trainer.get_eval_dataloader()))["labels"].dtype.is_floating_point


def test_average_state_dicts_means_floats_and_keeps_index_buffers():
    first = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1])}
    second = {"w": torch.tensor([3.0, 6.0]), "ids": torch.tensor([0, 1])}
    averaged = average_state_dicts([first, second])
    torch.testing.assert_close(averaged["w"], torch.tensor([2.0, 4.0]))
    assert averaged["ids"].dtype == torch.long and averaged["ids"].tolist() == [0, 1]


def test_soup_averages_members_that_share_the_initialisation(tmp_path, ingested, splits):
    from transformers import AutoModelForSequenceClassification

    cfg = _config(ingested, soup_size=3)
    result = finetune(cfg.base_model, *splits, tmp_path, cfg)
    members = result["soup"]["members"]
    assert [m["seed"] for m in members] == [cfg.seed, cfg.seed + 1000, cfg.seed + 2000]
    kept = result["soup"]["kept_seeds"]
    best_member = max(members, key=lambda m: m["val_macro_f1"])
    # Greedy: the best member comes first and the soup is never worse than it on validation.
    assert kept[0] == best_member["seed"]
    assert result["best_val_macro_f1"] >= best_member["val_macro_f1"]
    soup = AutoModelForSequenceClassification.from_pretrained(result["model_dir"])
    base, _ = load_classifier(cfg.base_model)
    moved = [name for name, p in soup.state_dict().items() if p.is_floating_point() and not torch.equal(p, base.state_dict()[name])]
    assert moved, "the soup's weights are the base's: no member trained"
    assert not list(tmp_path.glob("member-*/checkpoints"))


def test_uniform_soup_keeps_every_member(tmp_path, ingested, splits):
    cfg = _config(ingested, soup_size=2, soup_method="uniform")
    result = finetune(cfg.base_model, *splits, tmp_path, cfg)
    assert sorted(result["soup"]["kept_seeds"]) == [cfg.seed, cfg.seed + 1000]


def test_mean_pooling_head_trains_saves_and_reloads_with_the_auto_class(tmp_path, ingested, splits):
    from transformers import AutoModelForSequenceClassification

    from pipeline.train.pooling import MeanPoolBertForSequenceClassification

    cfg = _config(ingested, pooling="mean")
    result = finetune(cfg.base_model, *splits, tmp_path, cfg)
    reloaded = AutoModelForSequenceClassification.from_pretrained(result["model_dir"]).eval()
    assert isinstance(reloaded, MeanPoolBertForSequenceClassification)
    tokenizer = load_classifier(result["model_dir"])[1]
    texts = splits[1]["text"].head(4).tolist()
    batch = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reloaded(**batch).logits
        # Padding does not move the mean: each text alone gives its row of the padded batch.
        for i, text in enumerate(texts):
            alone = reloaded(**tokenizer([text], truncation=True, max_length=64, return_tensors="pt")).logits
            torch.testing.assert_close(alone[0], logits[i], atol=1e-5, rtol=1e-4)

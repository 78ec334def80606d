"""Fine-tuning options on the tiny BERT: LoRA merged for export, soft targets
from annotator agreement, layer-wise learning-rate decay, mean pooling."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data.ingest import load_split
from pipeline.train.classify import apply_lora, build_trainer, count_parameters, finetune
from pipeline.train.model import load_classifier
from pipeline.train.targets import soft_targets, with_targets
from pipeline.train.trainer import classification_loss


@pytest.fixture(scope="module")
def splits(ingested):
    # A slice of the train split keeps each fine-tuning run to a few seconds on 2 CPU cores.
    train = load_split(ingested.labeled_dir, "train").sample(n=96, random_state=0).reset_index(drop=True)
    return train, load_split(ingested.labeled_dir, "validation")


def _config(settings, **overrides):
    return TrainConfig.model_validate({**settings.train.model_dump(), "epochs": 1, **overrides})


def _lora_param_count(config, r: int) -> int:
    hidden, layers = config.hidden_size, config.num_hidden_layers
    # query and value of each layer get A (r x hidden) and B (hidden x r); the head is a full copy.
    return layers * 2 * (r * hidden + hidden * r) + hidden * 3 + 3


def test_lora_wraps_only_query_value_and_the_head(ingested):
    cfg = _config(ingested, finetune_method="lora", lora_r=4)
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

    cfg = _config(ingested, finetune_method="lora", lora_r=4)
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

    cfg = _config(ingested, finetune_method="lora", lora_r=4)
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


def test_layer_wise_lr_decay_param_groups(tmp_path, ingested, splits):
    cfg = _config(ingested, layer_lr_decay=0.5, learning_rate=1e-3, weight_decay=0.01, pooling="cls")
    model, tokenizer = load_classifier(cfg.base_model)
    rows = with_targets(splits[0], cfg.agreement_soft_labels)
    optimizer = build_trainer(model, tokenizer, rows, splits[1], tmp_path, cfg).create_optimizer()
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


def test_soft_targets_give_the_label_its_agreement_share():
    targets = soft_targets(np.array([0, 1, 2, 1]), np.array([100, 75, 66, 50]))
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(targets[1], [0.125, 0.75, 0.125])
    np.testing.assert_allclose(targets[2], [0.17, 0.17, 0.66], rtol=1e-6)
    np.testing.assert_allclose(targets[3], [0.25, 0.5, 0.25])


def test_classification_loss_with_soft_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    # One-hot targets as floats give the hard-label loss.
    torch.testing.assert_close(classification_loss(logits, one_hot), classification_loss(logits, labels))
    soft = torch.tensor(soft_targets(labels.numpy(), np.array([100, 75, 66, 50, 50, 75])))
    torch.testing.assert_close(classification_loss(logits, soft), -(soft * log_probs).sum(-1).mean())
    assert abs(classification_loss(logits, soft).item() - classification_loss(logits, labels).item()) > 1e-3


def test_agreement_soft_labels_reach_the_loss(tmp_path, ingested, splits):
    train = splits[0]
    assert set(train["agreement"]) > {100}
    model, tokenizer = load_classifier(ingested.train.base_model)
    rows = with_targets(train, soft_labels=True)
    trainer = build_trainer(model, tokenizer, rows, splits[1], tmp_path, _config(ingested, agreement_soft_labels=True))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (len(batch["input_ids"]), 3)
    torch.testing.assert_close(batch["labels"].sum(-1), torch.ones(len(batch["labels"])))
    assert (batch["labels"].max(-1).values < 1).any()
    # Validation keeps hard labels, so its metrics score the majority label.
    assert not next(iter(trainer.get_eval_dataloader()))["labels"].dtype.is_floating_point


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


def test_config_refuses_options_that_do_not_fit_together():
    with pytest.raises(ValueError, match="lora_r applies only with finetune_method=lora"):
        TrainConfig(lora_r=4)
    with pytest.raises(ValueError, match="need a teacher_model"):
        TrainConfig(distill_corpus_texts=10)
    with pytest.raises(ValueError, match="need a teacher_model"):
        TrainConfig(distill_weight=0.8)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        TrainConfig(soup_size=4)
    assert TrainConfig(finetune_method="lora").lora_rank == 8
    assert TrainConfig(teacher_model="some/teacher").teacher_share == 0.5

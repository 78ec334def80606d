import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pipeline.train.fast_mlm import (
    StaticMaskCollator, fused_adamw, make_train_step, mlm_loss, num_predictions, use_eager_attention,
)

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, UNK, CLS, SEP, MASK)


def tiny_model(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


def packed_blocks(rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Ordinary tokens with [CLS] ... [SEP] text boundaries sprinkled in, as packing produces."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), VOCAB, (rows, seq), generator=g)
    ids[:, 0] = CLS
    boundaries = torch.rand((rows, seq), generator=g) < 0.05
    ids[boundaries] = SEP
    return ids


def collator(seed: int = 0) -> StaticMaskCollator:
    return StaticMaskCollator(MASK, VOCAB, SPECIAL, rate=0.15, generator=torch.Generator().manual_seed(seed))


def test_collator_masks_exactly_k_distinct_non_special_positions():
    ids = packed_blocks(64, 32)
    batch = collator()(ids)
    k = num_predictions(32)
    assert k == 5
    positions, labels = batch["masked_positions"], batch["masked_labels"]
    assert positions.shape == labels.shape == (64, k)
    assert bool((positions.diff(dim=1) > 0).all())  # sorted and distinct
    assert torch.equal(labels, ids.gather(1, positions))
    assert not bool(torch.isin(labels, torch.tensor(SPECIAL)).any())
    untouched = torch.ones_like(ids, dtype=torch.bool).scatter_(1, positions, False)
    assert torch.equal(batch["input_ids"][untouched], ids[untouched])


def test_collator_80_10_10_shares():
    ids = packed_blocks(1024, 64, seed=1)
    batch = collator(seed=1)(ids)
    seen = batch["input_ids"].gather(1, batch["masked_positions"])
    labels = batch["masked_labels"]
    n = labels.numel()  # 1024 * 10 predictions; one share's standard error is about 0.003
    masked = float((seen == MASK).sum()) / n
    kept = float((seen == labels).sum()) / n
    random = 1.0 - masked - kept
    assert masked == pytest.approx(0.8, abs=0.015)
    assert kept == pytest.approx(0.1, abs=0.015)
    assert random == pytest.approx(0.1, abs=0.015)


def test_collator_rejects_rows_without_k_eligible_tokens():
    ids = packed_blocks(2, 32)
    ids[1, 3:] = PAD
    with pytest.raises(ValueError, match="fewer than k"):
        collator()(ids)


def test_mlm_loss_equals_hf_loss_on_the_same_positions():
    model = tiny_model().eval()
    batch = collator()(packed_blocks(8, 64))
    labels = torch.full_like(batch["input_ids"], -100).scatter_(1, batch["masked_positions"], batch["masked_labels"])
    with torch.no_grad():
        ours = mlm_loss(model, batch["input_ids"], batch["masked_positions"], batch["masked_labels"])
        reference = model(input_ids=batch["input_ids"], labels=labels).loss
    assert float(ours) == pytest.approx(float(reference), abs=1e-5)


def loss_inputs(rows: int = 8, seq: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, masked_positions, masked_labels) of one masked batch, as mlm_loss takes them."""
    batch = collator()(packed_blocks(rows, seq))
    return batch["input_ids"], batch["masked_positions"], batch["masked_labels"]


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_train_step_decreases_loss_on_a_repeated_batch(autocast_dtype):
    model = tiny_model().train()
    step = make_train_step(model, fused_adamw(model, lr=1e-3), compile=False, autocast_dtype=autocast_dtype)
    batch = collator()(packed_blocks(8, 64))
    losses = [step(batch["input_ids"], batch["masked_positions"], batch["masked_labels"]) for _ in range(8)]
    assert not any(loss.requires_grad for loss in losses)
    values = [float(loss) for loss in losses]
    assert values[-1] < values[0] - 0.1, values


def test_eager_attention_computes_the_same_loss():
    model, args = tiny_model().eval(), loss_inputs()
    with torch.no_grad():
        before = mlm_loss(model, *args)
        use_eager_attention(model)
        assert model.config._attn_implementation == "finsent_eager_sdpa"
        torch.testing.assert_close(mlm_loss(model, *args), before)

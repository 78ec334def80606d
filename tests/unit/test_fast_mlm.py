import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, MPNetConfig

from pipeline.train.fast_mlm import (
    PackedBertForMaskedLM, PackedMPNetForMaskedLM, StaticMaskCollator, dropout_attention, num_predictions,
    replays_attention, use_replayed_attention,
)

on_a_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_run.sh runs it there)")

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


def labels_for(batch: dict) -> torch.Tensor:
    """The same masked positions in Hugging Face form: -100 off the masked positions."""
    return torch.full_like(batch["input_ids"], -100).scatter_(1, batch["masked_positions"], batch["masked_labels"])


def tiny_mpnet(seed: int = 0):
    torch.manual_seed(seed)
    config = MPNetConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=80, pad_token_id=PAD,
    )
    return PackedMPNetForMaskedLM(config)


@pytest.mark.parametrize("make_model", [lambda: PackedBertForMaskedLM(tiny_model().config), tiny_mpnet])
def test_masked_positions_loss_equals_hf_loss_on_the_same_positions(make_model):
    torch.manual_seed(0)
    model = make_model().eval()
    batch = collator()(packed_blocks(8, 64))
    with torch.no_grad():
        ours = model(**batch)
        reference = model(input_ids=batch["input_ids"], labels=labels_for(batch))
    assert ours.logits is None  # the head ran on the masked rows only and nothing else is returned
    assert float(ours.loss) == pytest.approx(float(reference.loss), abs=1e-5)
    assert reference.logits.shape == (8, 64, VOCAB)  # without masked_positions it is the parent's forward


def test_packed_model_has_the_parent_weights_and_keys(tmp_path):
    plain = tiny_model()
    plain.save_pretrained(tmp_path)
    packed = PackedBertForMaskedLM.from_pretrained(tmp_path)
    assert packed.state_dict().keys() == plain.state_dict().keys()
    for key, tensor in plain.state_dict().items():
        torch.testing.assert_close(packed.state_dict()[key], tensor)


def test_collator_takes_the_trainer_rows():
    ids = packed_blocks(4, 32)
    from_rows = collator()([{"input_ids": row.tolist()} for row in ids])
    from_tensor = collator()(ids)
    for name, tensor in from_tensor.items():
        assert torch.equal(from_rows[name], tensor)


def attention_inputs(seed: int = 0) -> list[torch.Tensor]:
    """query, key, value as [batch 2, sequence 16, heads 3, head size 8]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 3, 8, generator=g, requires_grad=True) for _ in range(3)]


def sdpa_seq_major(q, k, v, **options):
    """Plain SDPA on [B, S, H, D] tensors, as transformers calls it."""
    heads_first = (tensor.transpose(1, 2) for tensor in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(*heads_first, **options).transpose(1, 2)


def test_replayed_dropout_attention_has_sdpas_output_gradients_and_random_stream():
    grad = torch.randn(2, 16, 3, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for op in ("sdpa", "replayed"):
        q, k, v = attention_inputs()
        torch.manual_seed(123)
        if op == "sdpa":
            output = sdpa_seq_major(q, k, v, dropout_p=0.3, scale=0.25)
        else:
            output, _ = dropout_attention(q, k, v, 0.3, 0.25)
            assert output.is_contiguous() and output.shape == q.shape
        output.backward(grad)
        results.append((output.detach(), q.grad, k.grad, v.grad, torch.rand(4)))
    q, k, v = attention_inputs()
    without_dropout = sdpa_seq_major(q, k, v, scale=0.25).detach()
    assert not torch.allclose(results[0][0], without_dropout)  # dropout did drop something
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference)


def test_replayed_dropout_attention_passes_opcheck_and_compiles():
    q, k, v = attention_inputs()
    torch.library.opcheck(dropout_attention, (q, k, v, 0.0, 0.25))

    def loss(q, k, v):
        output, _ = dropout_attention(q, k, v, 0.2, 0.25)
        return output.square().sum()

    grads = []
    for function in (loss, torch.compile(loss, fullgraph=True)):
        inputs = attention_inputs()
        torch.manual_seed(7)
        function(*inputs).backward()
        grads.append([tensor.grad for tensor in inputs])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=on_a_gpu)])
def test_replayed_attention_under_cuda_graphs_replays_each_steps_own_mask(device):
    """With the identity as values, attention's output is its dropped-out weights, so the values'
    gradient is output^T @ grad_output exactly when the backward replayed the forward's mask.
    Compiled with CUDA graphs (reduce-overhead; on a CPU nothing is captured) it must hold at every
    step, through warm-up, recording and replays, and every step must draw a new mask."""
    seq = 32
    torch._dynamo.reset()

    def attend(query, key, value):
        output, _ = dropout_attention(query.sin(), key, value, 0.3, 0.125)
        return output * 2  # compiled kernels on both sides of the op

    step = torch.compile(attend, mode="reduce-overhead")
    g = torch.Generator().manual_seed(0)
    query, key = (torch.randn(2, seq, 1, seq, generator=g).to(device).requires_grad_() for _ in range(2))
    value = torch.eye(seq).expand(2, seq, seq).unsqueeze(2).contiguous().to(device).requires_grad_()  # [B, S, 1, S]
    weights = []
    for index in range(4):
        grad_output = torch.randn(2, seq, 1, seq, generator=g).to(device)
        value.grad = None
        output = step(query, key, value)
        output.backward(grad_output)
        weights.append(output.detach().squeeze(2).clone())  # 2 x the dropped-out weights, [B, S, S]
        expected = weights[-1].transpose(1, 2) @ grad_output.squeeze(2)
        torch.testing.assert_close(value.grad.squeeze(2), expected, msg=f"step {index}")
        del output  # the graph's output buffers are the next replay's: nothing of this step stays alive
    assert not any(torch.equal(before, after) for before, after in zip(weights, weights[1:]))


def test_replayed_attention_trains_the_model_as_sdpa_does(monkeypatch):
    import pipeline.train.fast_mlm as fast_mlm

    calls = []
    monkeypatch.setattr(fast_mlm, "dropout_attention", lambda *args: calls.append(1) or dropout_attention(*args))
    batch = collator()(packed_blocks(4, 64))
    grads = {}
    for name in ("sdpa", "replayed"):
        torch.manual_seed(0)
        model = PackedBertForMaskedLM(tiny_model().config).train()
        if name == "replayed":
            use_replayed_attention(model)
        torch.manual_seed(5)
        model(**batch).loss.backward()
        grads[name] = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2  # once per layer: the op, not transformers' SDPA, ran the replayed model's attention
    assert grads["replayed"].keys() == grads["sdpa"].keys()
    for key, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["replayed"][key], grad, msg=key)


def test_replays_attention_only_where_compiled_on_a_gpu_with_dropout_and_the_model_takes_it():
    bert = PackedBertForMaskedLM(tiny_model().config)
    assert replays_attention(bert, compiled_on_gpu=True)
    assert not replays_attention(bert, compiled_on_gpu=False)  # uncompiled SDPA keeps its fused kernel
    assert not replays_attention(tiny_mpnet(), compiled_on_gpu=True)  # MPNet's attention is its own
    config = tiny_model().config
    config.attention_probs_dropout_prob = 0.0
    assert not replays_attention(PackedBertForMaskedLM(config), compiled_on_gpu=True)  # no dropout: nothing to replay

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, MPNetConfig

from pipeline.train.fast_mlm import (
    TRAINING_ATTENTION, PackedBertForMaskedLM, PackedMPNetForMaskedLM, StaticMaskCollator,
    dropout_attention, num_predictions, plain_linears, residual_stream_in_autocast_dtype, set_dropout,
    training_attention, use_eager_attention, use_float8_linears,
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


def loss_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training(ours: tuple, reference: tuple) -> None:
    torch.testing.assert_close(ours[0], reference[0])
    assert ours[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        torch.testing.assert_close(ours[1][name], grad, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(("sparse_last", "fused_qkv"), [(True, False), (False, True), (True, True)])
def test_last_layer_on_masked_rows_and_fused_projections_train_as_transformers_layers(attention, sparse_last, fused_qkv):
    """The last encoder layer computed on the k masked rows only (queries, attention output,
    feed-forward; keys and values from every position), and query, key and value as one product,
    train exactly as transformers' layers do. Dropout off: otherwise the two draw their masks
    over different shapes."""
    config = tiny_model().config
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = PackedBertForMaskedLM(config).train()
    model.set_attn_implementation(attention)
    batch = collator()(packed_blocks(4, 64))
    model.last_layer_on_masked_rows = False
    reference = loss_and_gradients(model, batch)
    rows_seen, products = [], []
    model.bert.encoder.layer[-1].intermediate.dense.register_forward_hook(
        lambda _module, inputs, _output: rows_seen.append(inputs[0].shape[:-1]))
    for layer in model.bert.encoder.layer:
        for projection in (layer.attention.self.query, layer.attention.self.key):
            projection.register_forward_hook(lambda *_: products.append(1))
    model.last_layer_on_masked_rows, model.fused_qkv = sparse_last, fused_qkv
    assert_same_training(loss_and_gradients(model, batch), reference)
    assert rows_seen == [(4, num_predictions(64) if sparse_last else 64)]  # the last feed-forward's rows
    # Fused, no projection module runs but the masked rows' queries (their own product).
    assert len(products) == (int(sparse_last) if fused_qkv else 2 * config.num_hidden_layers)


@pytest.mark.parametrize("make_model", [lambda: PackedBertForMaskedLM(tiny_model().config), tiny_mpnet])
def test_vocab_projection_padded_on_a_gpu_is_the_same_function(monkeypatch, make_model):
    """On a GPU the masked-positions loss runs the vocabulary projection with its outputs padded
    to a multiple of 64 (1000 -> 1024 here); on a CPU it does not. Made to pad on the CPU, it
    trains exactly as unpadded. The parent's forward (full head, Hugging Face's labels) is left
    as transformers wrote it, padding or not."""
    torch.manual_seed(0)
    model = make_model().train()
    batch = collator()(packed_blocks(4, 64))
    products = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: products.append(w.shape[0]) or linear(x, w, b))
    torch.manual_seed(1)
    plain = loss_and_gradients(model, batch)
    assert 1024 not in products
    monkeypatch.setattr(type(model), "pad_vocab_on", ("cpu",))
    torch.manual_seed(1)
    assert_same_training(loss_and_gradients(model, batch), plain)
    assert products.count(1024) == 1
    model.eval()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], labels=labels_for(batch))
    assert full.logits.shape == (4, 64, VOCAB) and products.count(1024) == 1
    assert torch.isfinite(full.loss)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=on_a_gpu)])
def test_bf16_residual_stream_under_autocast_trains_close_to_the_float32_stream(device):
    """With the layer norms' outputs in bf16 under bf16 autocast, the layers take bf16 hidden
    states (float32 without), parameters and gradients stay float32, and loss and gradients stay
    close to the float32 stream's. Outside autocast nothing changes; removed, the hooks are gone."""
    torch.manual_seed(0)
    model = PackedBertForMaskedLM(tiny_model().config).to(device).train()
    model.set_attn_implementation("eager")  # deterministic on a GPU too: each run is compared with another
    batch = {key: tensor.to(device) for key, tensor in collator()(packed_blocks(4, 64)).items()}
    streams = []
    for layer in model.bert.encoder.layer:  # a query projection's input is its layer's input
        layer.attention.self.query.register_forward_pre_hook(lambda _module, inputs: streams.append(inputs[0].dtype))

    def run(autocast: bool) -> tuple:
        streams.clear()
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return loss_and_gradients(model, batch)

    float32_stream, plain = run(autocast=True), run(autocast=False)
    assert streams == [torch.float32] * 2
    handles = residual_stream_in_autocast_dtype(model)
    assert len(handles) == 2 * 2 + 2  # two per layer, the embeddings' and the head's
    bf16_stream = run(autocast=True)
    assert streams == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(grad.dtype == torch.float32 for grad in bf16_stream[1].values())
    assert abs(bf16_stream[0] - float32_stream[0]) < 0.01 * float32_stream[0]
    grads = [torch.cat([g.flatten() for g in result[1].values()]) for result in (float32_stream, bf16_stream)]
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.99
    assert not torch.equal(*grads)  # the stream was rounded
    assert_same_training(run(autocast=False), plain)
    assert streams == [torch.float32] * 2
    for handle in handles:
        handle.remove()
    assert_same_training(run(autocast=True), float32_stream)


def test_collator_takes_the_trainer_rows():
    ids = packed_blocks(4, 32)
    from_rows = collator()([{"input_ids": row.tolist()} for row in ids])
    from_tensor = collator()(ids)
    for name, tensor in from_tensor.items():
        assert torch.equal(from_rows[name], tensor)


def test_eager_attention_computes_the_same_loss():
    torch.manual_seed(0)
    model = PackedBertForMaskedLM(tiny_model().config).eval()
    batch = collator()(packed_blocks(8, 64))
    with torch.no_grad():
        before = model(**batch).loss
        use_eager_attention(model)
        assert model.config._attn_implementation == "finsent_eager_sdpa"
        torch.testing.assert_close(model(**batch).loss, before)


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


@pytest.mark.parametrize("attention", ["replayed", "cudnn"])
def test_replayed_attention_trains_the_model_as_sdpa_does(monkeypatch, attention):
    """cuDNN's op exists on a GPU only: elsewhere ``cudnn`` runs the replayed op."""
    import pipeline.train.fast_mlm as fast_mlm

    calls = []
    monkeypatch.setattr(fast_mlm, "dropout_attention", lambda *args: calls.append(1) or dropout_attention(*args))
    batch = collator()(packed_blocks(4, 64))
    grads = {}
    for name in ("sdpa", attention):
        torch.manual_seed(0)
        model = PackedBertForMaskedLM(tiny_model().config).train()
        if name != "sdpa":
            TRAINING_ATTENTION[name](model)
        torch.manual_seed(5)
        model(**batch).loss.backward()
        grads[name] = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2  # once per layer: the op, not transformers' SDPA, ran the replayed model's attention
    assert grads[attention].keys() == grads["sdpa"].keys()
    for key, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads[attention][key], grad, msg=key)


@on_a_gpu
def test_cudnn_attention_on_a_gpu_is_sdpas_cudnn_kernel_with_its_own_backward():
    """The same random state gives the same dropout mask: output and gradients equal SDPA's own
    cuDNN kernel and its backward (head size 64, as bert-base's)."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.train.fast_mlm import _cudnn_sdpa_forward

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 128, 2, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3)]
    grad_output = torch.randn(2, 128, 2, 64, generator=g).to("cuda", torch.bfloat16)
    heads_first = [tensor.transpose(1, 2) for tensor in inputs]  # [B, H, S, D] views, as transformers passes them
    results = []
    for ours in (True, False):
        torch.manual_seed(3)
        if ours:
            output, _ = _cudnn_sdpa_forward(SimpleNamespace(is_causal=False), *heads_first, None, dropout=0.3, scaling=0.125)
        else:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                output = torch.nn.functional.scaled_dot_product_attention(*heads_first, dropout_p=0.3, scale=0.125)
            output = output.transpose(1, 2)
        output.backward(grad_output)
        results.append([output.detach()] + [tensor.grad for tensor in inputs])
        for tensor in inputs:
            tensor.grad = None
    with torch.no_grad():
        undropped = torch.nn.functional.scaled_dot_product_attention(*heads_first, scale=0.125).transpose(1, 2)
    assert not torch.allclose(results[0][0], undropped, rtol=0.05, atol=0.05)  # dropout ran
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference)


def attention_gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for name, p in model.named_parameters() if "attention.self" in name])


@on_a_gpu
def test_cudnn_attention_compiles_whole_and_draws_the_eager_runs_masks():
    """Compiled, the model is one graph and its attention still takes the fused kernels: with
    dropout in attention only, the compiled step's attention gradients match the eager step's
    from the same seed, and not from another seed (a math-path attention draws other masks)."""
    from torch._dynamo.utils import counters

    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.3)
    batch = {name: tensor.cuda() for name, tensor in collator()(packed_blocks(4, 64)).items()}

    def gradients(step, model, seed: int) -> torch.Tensor:
        model.zero_grad()
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step(**batch).loss.backward()
        return attention_gradients(model)

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(PackedBertForMaskedLM(config).cuda().train())
        TRAINING_ATTENTION["cudnn"](models[-1])
    eager = gradients(models[0], models[0], seed=5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(models[1])
    same_seed, other_seed = gradients(compiled, models[1], seed=5), gradients(compiled, models[1], seed=6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]

    def distance(a: torch.Tensor) -> float:
        return float((a - eager).norm() / eager.norm())

    assert distance(same_seed) < 0.05 < distance(other_seed)


def test_training_attention_replays_only_where_compiled_on_a_gpu_with_dropout_and_the_model_takes_it():
    bert = PackedBertForMaskedLM(tiny_model().config)
    assert training_attention("auto", bert, compiled_on_gpu=True) == "replayed"
    assert training_attention("auto", bert, compiled_on_gpu=False) == "sdpa"  # uncompiled SDPA keeps its fused kernel
    assert training_attention("auto", tiny_mpnet(), compiled_on_gpu=True) == "sdpa"  # MPNet's attention is its own
    assert training_attention("sdpa", bert, compiled_on_gpu=True) == "sdpa"
    assert training_attention("replayed", bert, compiled_on_gpu=False) == "replayed"
    assert training_attention("cudnn", bert, compiled_on_gpu=True) == "cudnn"  # by name only, until timed
    for setting in TRAINING_ATTENTION:
        with pytest.raises(ValueError, match=f"mlm_attention={setting}: PackedMPNetForMaskedLM does not take"):
            training_attention(setting, tiny_mpnet(), compiled_on_gpu=True)
    set_dropout(bert, 0.0)
    assert training_attention("auto", bert, compiled_on_gpu=True) == "sdpa"  # no dropout: nothing to replay


def test_set_dropout_reaches_every_dropout_layer_and_puts_their_own_back():
    model = PackedBertForMaskedLM(tiny_model().config)
    model.bert.encoder.layer[0].output.dropout.p = 0.3  # one layer with a probability of its own
    own = {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}
    assert len(own) == 1 + 2 * 3  # the embeddings', and each layer's attention, attention output and output
    restore = set_dropout(model, 0.0)
    model.train()
    ids = packed_blocks(2, 32)
    torch.manual_seed(0)
    first = model.bert(input_ids=ids).last_hidden_state
    torch.manual_seed(1)
    assert torch.equal(first, model.bert(input_ids=ids).last_hidden_state)  # no random masks left, attention's included
    restore()
    assert {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)} == own
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.1


def test_float8_linears_train_close_to_full_precision_and_convert_back():
    from torchao.float8.float8_linear import Float8Linear

    batch = collator()(packed_blocks(4, 32))
    reference = PackedBertForMaskedLM(tiny_model().config).train()
    model = PackedBertForMaskedLM(tiny_model().config).train()
    model.load_state_dict(reference.state_dict())
    keys = list(model.state_dict())

    assert use_float8_linears(model) == 12  # q, k, v, attention output, intermediate, output: 6 per layer
    assert not isinstance(model.cls.predictions.transform.dense, Float8Linear)  # the head stays as it is
    losses, grads = [], []
    for m in (reference, model):
        torch.manual_seed(1)  # the same dropout masks
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in m.bert.encoder.parameters()]))
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0]
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
    assert not torch.equal(grads[0], grads[1])  # the float8 products did run
    model.fused_qkv = True  # one product from the concatenated weights would skip float8's own
    with pytest.raises(ValueError, match="plain linear layers"):
        model(**batch)
    model.fused_qkv = False

    parameters = list(model.parameters())
    plain_linears(model)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(parameters, model.parameters()))
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, reference(input_ids=batch["input_ids"]).logits)

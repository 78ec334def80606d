"""Tests of the levers in bench/mlm_levers.py (not yet timed on a GPU); the GPU-only ones skip
elsewhere. ``.venv/bin/pytest bench/test_mlm_levers.py``; bench/gpu_run.sh's check phase runs
them on a GPU beside tests/unit/test_fast_mlm.py."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mlm_levers import (  # noqa: E402
    ATTENTION, LeverBertForMaskedLM, _cudnn_sdpa_forward, apply_recipe_levers, lever_class,
    packed_bert_class, residual_stream_in_autocast_dtype, set_dropout, use_eager_attention,
)
from pipeline.train.fast_mlm import (  # noqa: E402
    PACKED_MLM_CLASSES, PackedBertForMaskedLM, dropout_attention, num_predictions,
)
from tests.unit.test_fast_mlm import VOCAB, collator, labels_for, on_a_gpu, packed_blocks, tiny_model  # noqa: E402
from transformers import BertConfig  # noqa: E402


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


def test_levers_off_is_the_trainers_step():
    torch.manual_seed(0)
    ours = LeverBertForMaskedLM(tiny_model().config).train()
    reference = PackedBertForMaskedLM(tiny_model().config).train()
    reference.load_state_dict(ours.state_dict())
    batch = collator()(packed_blocks(4, 64))
    results = []
    for model in (ours, reference):
        torch.manual_seed(1)
        results.append(loss_and_gradients(model, batch))
    assert_same_training(*results)


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
    model = LeverBertForMaskedLM(config).train()
    model.set_attn_implementation(attention)
    batch = collator()(packed_blocks(4, 64))
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


def test_vocab_projection_padded_is_the_same_function(monkeypatch):
    """Padded to a multiple of 64 (1000 -> 1024 here) on a GPU only; made to pad on the CPU, it
    trains exactly as unpadded. The parent's forward (full head, Hugging Face's labels) is left
    as transformers wrote it, padding or not."""
    torch.manual_seed(0)
    model = lever_class(vocab_multiple=64)(tiny_model().config).train()
    batch = collator()(packed_blocks(4, 64))
    products = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: products.append(w.shape[0]) or linear(x, w, b))
    torch.manual_seed(1)
    plain = loss_and_gradients(model, batch)
    assert 1024 not in products
    model.pad_vocab_on = ("cpu",)
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
    model = LeverBertForMaskedLM(tiny_model().config).to(device).train()
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


def test_recipe_levers_apply_once_every_parameter_trains_and_adapt_mlm_builds_the_lever_class(tmp_path):
    """A new head trained alone (the rest frozen) trains with the model's own recipe; the levers
    apply once the whole model trains. packed_bert_class swaps the class adapt_mlm builds, then
    puts the trainer's back; a saved lever model names BertForMaskedLM."""
    cls = lever_class(dropout=0.0, bf16_residual=True)
    model = cls(tiny_model().config)
    frozen = [p for name, p in model.named_parameters() if not name.startswith("cls.")]
    for parameter in frozen:
        parameter.requires_grad_(False)
    model.train()
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    for parameter in frozen:
        parameter.requires_grad_(True)
    model.train()
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    hooks = sum(len(m._forward_hooks) for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    apply_recipe_levers(model)
    model.train()
    assert hooks == 2 * 2 + 2 == sum(len(m._forward_hooks) for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert cls.__bases__[-1].__name__ == "BertForMaskedLM"
    with packed_bert_class(cls):
        assert PACKED_MLM_CLASSES["bert"] is cls
    assert PACKED_MLM_CLASSES["bert"] is PackedBertForMaskedLM
    with pytest.raises(TypeError, match="not a lever: warp"):
        lever_class(warp=True)


def test_eager_attention_computes_the_same_loss():
    torch.manual_seed(0)
    model = PackedBertForMaskedLM(tiny_model().config).eval()
    batch = collator()(packed_blocks(8, 64))
    with torch.no_grad():
        before = model(**batch).loss
        use_eager_attention(model)
        assert model.config._attn_implementation == "finsent_eager_sdpa"
        torch.testing.assert_close(model(**batch).loss, before)


def test_cudnn_attention_off_a_gpu_trains_the_model_as_sdpa_does(monkeypatch):
    """cuDNN's op exists on a GPU only: elsewhere ``cudnn`` runs the replayed op."""
    import pipeline.train.fast_mlm as fast_mlm

    calls = []
    monkeypatch.setattr(fast_mlm, "dropout_attention", lambda *args: calls.append(1) or dropout_attention(*args))
    batch = collator()(packed_blocks(4, 64))
    grads = {}
    for name in ("sdpa", "cudnn"):
        torch.manual_seed(0)
        model = PackedBertForMaskedLM(tiny_model().config).train()
        if ATTENTION[name] is not None:
            ATTENTION[name](model)
        torch.manual_seed(5)
        model(**batch).loss.backward()
        grads[name] = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2  # once per layer: the replayed op ran the cudnn model's attention
    assert grads["cudnn"].keys() == grads["sdpa"].keys()
    for key, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["cudnn"][key], grad, msg=key)


@on_a_gpu
def test_cudnn_attention_on_a_gpu_is_sdpas_cudnn_kernel_with_its_own_backward():
    """The same random state gives the same dropout mask: output and gradients equal SDPA's own
    cuDNN kernel and its backward (head size 64, as bert-base's)."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel

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
        ATTENTION["cudnn"](models[-1])
    eager = gradients(models[0], models[0], seed=5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(models[1])
    same_seed, other_seed = gradients(compiled, models[1], seed=5), gradients(compiled, models[1], seed=6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]

    def distance(a: torch.Tensor) -> float:
        return float((a - eager).norm() / eager.norm())

    assert distance(same_seed) < 0.05 < distance(other_seed)

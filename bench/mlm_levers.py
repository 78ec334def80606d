"""Speed levers of the masked-LM step that are written but **not yet timed on a GPU**.

The project's trainer (``pipeline.train.fast_mlm``) keeps only what a GPU measured faster. These
levers live here until ``bench/train_throughput.py`` times them on one (its ``--compile-mode``
suffixes in brackets); the figures below are byte counts or single-product timings, not step
timings. Exact ones (the same loss and gradients):

* the last encoder layer on the masked rows only (``:sparselast``): keys and values from every
  position; queries, attention output and feed-forward on the ``B * k`` rows the head reads;
* query, key and value as one product (``:fusedqkv``): an H100 ran the fused 768 -> 2304 product at
  702 TFLOP/s against 608 for 768 -> 768 (``bench/gemm_floor.py``), about 1 ms a step if it carries
  over;
* the vocabulary projection padded to a multiple of 64 outputs on a GPU (``:padvocab``): 30,522
  outputs leave the product's rows misaligned for the tensor-core kernels, and an H100 ran that
  product at 243 TFLOP/s against 600-720 for the encoder's (``bench/gemm_floor.py``);
* cuDNN's fused attention op with its own backward, no replay (``:cudnnattn``);
* attention left outside the compiled graph (``:eagerattn``), only for comparison.

Recipe changes (a different training, checked by ``bench/mlm_step_check.py``):

* the residual stream between layers in bf16 under autocast (``:bf16res``): 16 % fewer bytes in
  the compiled step's own kernels at bert-base by the compiler's count (``bench/step_bytes.py``);
* another dropout probability while training, 0 for none (``:nodrop``).

:class:`LeverBertForMaskedLM` is ``PackedBertForMaskedLM`` with the exact levers as switches
(all off: the trainer's step); :func:`lever_class` makes a subclass with levers set, for code
that builds the model itself (``adapt_mlm``, through :func:`packed_bert_class`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, BertForMaskedLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward

from pipeline.train.fast_mlm import (
    PACKED_MLM_CLASSES, PackedBertForMaskedLM, _replayed_sdpa_forward, _takes_fused_dropout_op, use_replayed_attention,
)

VOCAB_MULTIPLE = 64


# ---------------------------------------------------------------- exact levers of BERT's step


# BertForMaskedLM last among the bases: a saved model's config.json names it (adapt_mlm writes
# ``type(model).__bases__[-1]``), as it does for PackedBertForMaskedLM.
class LeverBertForMaskedLM(PackedBertForMaskedLM, BertForMaskedLM):
    """``PackedBertForMaskedLM`` with switches; with all of them off it is the trainer's step.
    The recipe levers ``bf16_residual`` and ``dropout`` are applied by :func:`apply_recipe_levers`,
    called by ``train()`` once every parameter trains (not while a new head trains alone)."""

    last_layer_on_masked_rows = False
    fused_qkv = False
    vocab_multiple = 1  # VOCAB_MULTIPLE pads the vocabulary projection
    pad_vocab_on = ("cuda",)  # device types; a CPU gains nothing from aligned rows
    bf16_residual = False
    dropout: float | None = None  # None: the model's own
    _recipe_applied = False

    def hidden_at(self, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.config.is_decoder or not (self.last_layer_on_masked_rows or self.fused_qkv):
            return super().hidden_at(input_ids, rows)
        hidden = self.bert.embeddings(input_ids=input_ids)
        *layers, last = self.bert.encoder.layer
        for layer in layers:
            hidden = bert_layer(layer, hidden, fused_qkv=True) if self.fused_qkv else layer(hidden)
        if self.last_layer_on_masked_rows:
            return bert_layer(last, hidden, rows, fused_qkv=self.fused_qkv)
        return bert_layer(last, hidden, fused_qkv=self.fused_qkv).gather(1, rows)

    def vocabulary_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The vocabulary projection, on a ``pad_vocab_on`` device with its outputs padded to a
        multiple of ``vocab_multiple`` by zero rows and the padded logits cut off again: the same
        function and parameters."""
        decoder = self.get_output_embeddings()
        pad = -decoder.out_features % self.vocab_multiple
        if pad == 0 or features.device.type not in self.pad_vocab_on:
            return decoder(features)
        bias = None if decoder.bias is None else F.pad(decoder.bias, (0, pad))
        return F.linear(features, F.pad(decoder.weight, (0, 0, 0, pad)), bias)[..., : decoder.out_features]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and all(p.requires_grad for p in self.parameters()):
            apply_recipe_levers(self)
        return self


LEVERS = ("last_layer_on_masked_rows", "fused_qkv", "vocab_multiple", "pad_vocab_on", "bf16_residual", "dropout")


def lever_class(**levers) -> type[LeverBertForMaskedLM]:
    """A subclass of :class:`LeverBertForMaskedLM` with these levers (``LEVERS``) set."""
    if unknown := set(levers) - set(LEVERS):
        raise TypeError(f"not a lever: {', '.join(sorted(unknown))}")
    return type("LeverBertForMaskedLM", (LeverBertForMaskedLM, BertForMaskedLM), dict(levers))


@contextlib.contextmanager
def packed_bert_class(cls: type[PackedBertForMaskedLM]) -> Iterator[None]:
    """``adapt_mlm`` builds a BERT base as ``PACKED_MLM_CLASSES["bert"]``: as ``cls`` meanwhile."""
    own = PACKED_MLM_CLASSES["bert"]
    PACKED_MLM_CLASSES["bert"] = cls
    try:
        yield
    finally:
        PACKED_MLM_CLASSES["bert"] = own


def _one_product(features: torch.Tensor, *linears: torch.nn.Linear) -> tuple[torch.Tensor, ...]:
    """Several linear layers of the same input as one product, their outputs split apart again."""
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears])
    return F.linear(features, weight, bias).split([linear.out_features for linear in linears], dim=-1)


def bert_layer(layer: BertLayer, hidden: torch.Tensor, rows: torch.Tensor | None = None,
               fused_qkv: bool = False) -> torch.Tensor:
    """``layer(hidden)`` without attention mask, from the layer's own modules; with ``rows`` (a
    gather index ``[B, k, hidden]``) ``layer(hidden).gather(1, rows)``, computing only those rows:
    keys and values come from every position, everything else from the gathered rows. With
    ``fused_qkv`` the projections of the same input run as one product. Written here because
    transformers' layers take neither a query subset nor fused projections."""
    attention = layer.attention.self
    batch, head_size = hidden.shape[0], attention.attention_head_size
    selected = hidden if rows is None else hidden.gather(1, rows)
    if fused_qkv and rows is None:
        query, key, value = _one_product(hidden, attention.query, attention.key, attention.value)
    elif fused_qkv:
        query, (key, value) = attention.query(selected), _one_product(hidden, attention.key, attention.value)
    else:
        query, key, value = attention.query(selected), attention.key(hidden), attention.value(hidden)

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.view(batch, states.shape[1], -1, head_size).transpose(1, 2)

    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    context, _ = attend(
        attention, heads(query), heads(key), heads(value), None,
        dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
    )
    attended = layer.attention.output(context.reshape(*selected.shape[:2], -1), selected)
    return layer.output(layer.intermediate(attended), attended)


# ---------------------------------------------------------------- attention variants

EAGER_SDPA = "finsent_eager_sdpa"


def use_eager_attention(model: torch.nn.Module) -> None:
    """Runs the model's attention outside the compiled graph, as plain SDPA: SDPA keeps a fused
    kernel with dropout, at the cost of one graph break per layer. For comparison only: on an
    H100 it ran at 1.62x the eager baseline against 1.68x for SDPA traced by the compiler."""
    AttentionInterface.register(EAGER_SDPA, torch.compiler.disable(sdpa_attention_forward))
    model.set_attn_implementation(EAGER_SDPA)


# On a GPU, SDPA's dispatcher picks cuDNN's fused attention (H100 profile, bench/RESULTS.md), whose
# forward returns the random seed and offset of its dropout mask and whose backward takes them.
# Called as that op (aten._scaled_dot_product_cudnn_attention), it bypasses the dispatcher's
# choice of the math path under the compiler; autograd and the compiler pair it with its own
# backward, so nothing is replayed. The op exists on CUDA only and takes no fallback, so this
# path is kept to what the profile saw it run: self-attention, dropout, no mask.

CUDNN_SDPA = "finsent_cudnn_sdpa"


def _cudnn_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: cuDNN's op on a GPU for self-attention with
    dropout, no mask, not causal; the replayed op (or transformers' SDPA) otherwise."""
    self_attention_on_gpu = query.is_cuda and query.shape[2] == key.shape[2]
    if not (self_attention_on_gpu and _takes_fused_dropout_op(module, attention_mask, dropout, is_causal, kwargs)):
        return _replayed_sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    output = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, dropout, False, False, scale=scaling)[0]
    return output.transpose(1, 2).contiguous(), None


def use_cudnn_attention(model: torch.nn.Module) -> None:
    """Attention with dropout as cuDNN's fused op and its own backward (no replay) on a GPU."""
    AttentionInterface.register(CUDNN_SDPA, _cudnn_sdpa_forward)
    model.set_attn_implementation(CUDNN_SDPA)


# The attention a benchmark run names -> what sets it up ("sdpa": transformers' own, nothing to do).
ATTENTION: dict[str, Callable[[torch.nn.Module], None] | None] = {
    "sdpa": None, "replayed": use_replayed_attention, "cudnn": use_cudnn_attention, "eager": use_eager_attention,
}


# ---------------------------------------------------------------- recipe levers


def apply_recipe_levers(model: LeverBertForMaskedLM) -> None:
    """The model's ``bf16_residual`` and ``dropout`` levers, once."""
    if model._recipe_applied:
        return
    model._recipe_applied = True
    if model.bf16_residual:
        residual_stream_in_autocast_dtype(model)
    if model.dropout is not None:
        set_dropout(model, model.dropout)


def set_dropout(model: torch.nn.Module, probability: float) -> Callable[[], None]:
    """Every dropout layer of ``model`` drops with ``probability``; transformers' layers read it
    at each call, attention included. The config is left as it is, so a saved model keeps its
    own dropout. Returns a function that puts each layer's own back."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    own = [layer.p for layer in layers]
    for layer in layers:
        layer.p = probability

    def restore() -> None:
        for layer, p in zip(layers, own):
            layer.p = p

    return restore


# Autocast runs layer norms in float32 and returns their output in float32, so BERT's residual
# stream (each layer's input, and the sum each layer norm normalises) stays float32 from layer
# to layer. The compiled step's dropout + residual + layer-norm kernels then read and write 4
# bytes an element where the products take 2, and write a bf16 copy for the next product besides;
# on an H100 they and their backward took a fifth of the step (bench/RESULTS.md). Casting the
# layer norms' output to the autocast dtype halves those bytes. The layer norm itself still
# computes in float32, and parameters, their gradients and the optimizer stay float32: what
# changes is the rounding of the stream between layers, as in training with bf16 activations.


def _layer_norm_output_in_autocast_dtype(_module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
    device = output.device.type
    if output.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return output.to(torch.get_autocast_dtype(device))
    return None


def residual_stream_in_autocast_dtype(model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Under autocast, every layer norm of ``model`` returns the autocast dtype instead of float32;
    outside autocast nothing changes. Returns the hooks' handles."""
    return [module.register_forward_hook(_layer_norm_output_in_autocast_dtype)
            for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]

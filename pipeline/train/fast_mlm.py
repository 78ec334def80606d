"""The masked-LM step of ``adapt_mlm`` on packed blocks: a static number of predictions
per row, no attention mask, and the vocabulary head applied to the masked positions only.

* :class:`StaticMaskCollator` masks exactly ``k = round(rate * block)`` positions of each
  row (BERT's ``max_predictions_per_seq``), so every shape is static: a compiled step never
  recompiles and never waits on the host for the size of a boolean mask.
* ``PackedBertForMaskedLM`` / ``PackedMPNetForMaskedLM`` are transformers' own masked-LM
  models (same weights, same state-dict keys) whose ``forward`` also takes
  ``masked_positions`` and ``masked_labels`` and then returns only the loss, computed on
  ``B * k`` rows instead of ``B * S``. Without them it is the parent's ``forward``. Being
  the model's own ``forward``, the loss runs inside whatever wraps the model: the Trainer's
  ``torch.compile``, DistributedDataParallel under torchrun, autocast.

transformers computes the head over every position (``BertForMaskedLM(labels=...)``); at
bert-base that is about a fifth of the model's FLOPs, 85 % of them on positions with no
label, hence these small classes. Two more savings, both exact:

* BERT's last encoder layer computes only the rows the head reads: keys and values from every
  position, queries, attention output and feed-forward on the ``B * k`` masked rows
  (``last_layer_on_masked_rows``; ``TrainConfig.mlm_sparse_last_layer``). Nothing else reads
  the other rows of that layer.
* On a GPU the vocabulary projection runs padded to a multiple of 64 outputs
  (``vocab_multiple``): 30,522 outputs leave the product's rows misaligned for the
  tensor-core kernels, and an H100 ran that product at 243 TFLOP/s against 600-720 for the
  encoder's (``bench/gemm_floor.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, BertForMaskedLM, MPNetForMaskedLM
from transformers.activations import gelu
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward


def num_predictions(seq_len: int, rate: float = 0.15) -> int:
    """BERT's ``max_predictions_per_seq``: how many positions each row predicts."""
    return max(1, round(rate * seq_len))


class StaticMaskCollator:
    """BERT masking on exactly ``k = round(rate * seq_len)`` non-special positions per row:
    80 % become [MASK], 10 % a random token, 10 % stay as they are.

    Takes packed blocks (a ``[B, S]`` tensor, or the Trainer's list of ``{"input_ids": ...}``
    rows) and returns ``input_ids`` (masked), ``masked_positions`` ``[B, k]`` and
    ``masked_labels`` ``[B, k]`` (the original tokens there). Without a ``generator`` the
    draws come from torch's global RNG; the masked-LM step sets one per batch (``NumberedBatchMasks``),
    so that a resumed run masks as an uncut one."""

    def __init__(
        self,
        mask_token_id: int,
        vocab_size: int,
        special_token_ids: Iterable[int],
        rate: float = 0.15,
        generator: torch.Generator | None = None,
    ) -> None:
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.special_token_ids = torch.tensor(sorted(set(special_token_ids)), dtype=torch.long)
        self.rate = rate
        self.generator = generator

    def maskable(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where a token may be masked (not a special token); a row needs k of them."""
        return ~torch.isin(torch.as_tensor(input_ids), self.special_token_ids)

    def __call__(self, features: torch.Tensor | Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if isinstance(features, torch.Tensor):
            input_ids = features.to(dtype=torch.long, device="cpu")
        else:
            input_ids = torch.tensor([list(row["input_ids"]) for row in features], dtype=torch.long)
        batch, seq_len = input_ids.shape
        k = num_predictions(seq_len, self.rate)
        eligible = self.maskable(input_ids)
        if bool((eligible.sum(dim=1) < k).any()):
            raise ValueError(f"a row has fewer than k={k} non-special tokens; pack texts into full blocks")

        # The k highest random scores among eligible positions: a uniform sample without replacement.
        scores = torch.rand(input_ids.shape, generator=self.generator).masked_fill_(~eligible, -1.0)
        positions = scores.topk(k, dim=1).indices.sort(dim=1).values
        labels = input_ids.gather(1, positions)

        choice = torch.rand((batch, k), generator=self.generator)
        random_tokens = torch.randint(self.vocab_size, (batch, k), generator=self.generator)
        replaced = torch.where(choice < 0.8, torch.full_like(labels, self.mask_token_id), labels)
        replaced = torch.where((choice >= 0.8) & (choice < 0.9), random_tokens, replaced)
        masked = input_ids.clone().scatter_(1, positions, replaced)
        return {"input_ids": masked, "masked_positions": positions, "masked_labels": labels}


class _MaskedPositionsLoss:
    """``forward(input_ids, masked_positions=, masked_labels=)``: mean cross-entropy over the
    k masked positions of each row, the head applied to those rows only. Blocks are full, so
    no attention mask is passed and SDPA may take a fused kernel.

    On a GPU the head's vocabulary projection runs with its outputs padded to a multiple of
    ``vocab_multiple`` by zero rows, the padded logits cut off again: the same function and
    parameters. Only here: the parent's ``forward`` (evaluation, Hugging Face's collator) stays
    as transformers wrote it.

    Each model class defines ``head_features(hidden)``: its masked-LM head up to the vocabulary
    projection (which is tied to the embeddings)."""

    base_model_prefix: str
    vocab_multiple = 64
    pad_vocab_on = ("cuda",)  # device types; a CPU gains nothing from aligned rows

    def forward(self, input_ids=None, masked_positions=None, masked_labels=None, **kwargs):
        if masked_positions is None:
            return super().forward(input_ids=input_ids, **kwargs)
        rows = masked_positions.unsqueeze(-1).expand(-1, -1, self.config.hidden_size)
        logits = self.vocabulary_logits(self.head_features(self.hidden_at(input_ids, rows)))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), masked_labels.flatten())
        return MaskedLMOutput(loss=loss)

    def hidden_at(self, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The encoder's output at the masked positions, ``[B, k, hidden]``; ``rows`` is the
        positions' gather index, ``[B, k, hidden]``."""
        return getattr(self, self.base_model_prefix)(input_ids=input_ids).last_hidden_state.gather(1, rows)

    def vocabulary_logits(self, features: torch.Tensor) -> torch.Tensor:
        decoder = self.get_output_embeddings()
        pad = -decoder.out_features % self.vocab_multiple
        if pad == 0 or features.device.type not in self.pad_vocab_on:
            return decoder(features)
        bias = None if decoder.bias is None else F.pad(decoder.bias, (0, pad))
        return F.linear(features, F.pad(decoder.weight, (0, 0, 0, pad)), bias)[..., : decoder.out_features]


class PackedBertForMaskedLM(_MaskedPositionsLoss, BertForMaskedLM):
    last_layer_on_masked_rows = True
    fused_qkv = False  # query, key and value as one product (bench: ':fusedqkv'); not yet timed on a GPU

    def hidden_at(self, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.config.is_decoder or not (self.last_layer_on_masked_rows or self.fused_qkv):
            return super().hidden_at(input_ids, rows)
        hidden = self.bert.embeddings(input_ids=input_ids)
        *layers, last = self.bert.encoder.layer
        for layer in layers:
            hidden = bert_layer(layer, hidden, fused_qkv=self.fused_qkv) if self.fused_qkv else layer(hidden)
        if self.last_layer_on_masked_rows:
            return bert_layer(last, hidden, rows, fused_qkv=self.fused_qkv)
        return bert_layer(last, hidden, fused_qkv=self.fused_qkv).gather(1, rows)

    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions.transform(hidden)


def _one_product(features: torch.Tensor, *linears: torch.nn.Linear) -> tuple[torch.Tensor, ...]:
    """Several linear layers of the same input as one product, their outputs split apart again."""
    if any(type(linear) is not torch.nn.Linear for linear in linears):  # a float8 layer's product is its own
        raise ValueError("fused_qkv needs plain linear layers, not float8 ones")
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


class PackedMPNetForMaskedLM(_MaskedPositionsLoss, MPNetForMaskedLM):
    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head  # MPNetLMHead.forward up to its decoder
        return head.layer_norm(gelu(head.dense(hidden)))


# The base's model type -> its masked-LM class with the masked-positions loss.
PACKED_MLM_CLASSES = {"bert": PackedBertForMaskedLM, "mpnet": PackedMPNetForMaskedLM}


def keep_attention_in_bf16() -> None:
    """Lets attention that falls back to SDPA's math path stay in bf16 (process-wide).

    A profile of the compiled step on an H200 (bench/RESULTS.md) showed attention with
    dropout lowered to SDPA's math path, which by default upcasts bf16 inputs to float32:
    its batched matmuls ran as float32 kernels and were 22 % of the step's GPU time.
    TF32 covers any float32 matmul that remains."""
    if hasattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp"):
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    torch.backends.cuda.matmul.allow_tf32 = True


EAGER_SDPA = "finsent_eager_sdpa"


def use_eager_attention(model: torch.nn.Module) -> None:
    """Runs the model's attention outside the compiled graph, as plain SDPA.

    Under ``torch.compile`` attention with dropout takes SDPA's math path (the fused
    flash / cuDNN kernels draw their dropout masks in ways the compiler does not trace);
    left eager, SDPA keeps a fused kernel with dropout, at the cost of one graph break per
    layer. Which wins is measured by ``bench/train_throughput.py`` (``:eagerattn``)."""
    AttentionInterface.register(EAGER_SDPA, torch.compiler.disable(sdpa_attention_forward))
    model.set_attn_implementation(EAGER_SDPA)


# ---------------------------------------------------------------- attention with dropout, opaque to the compiler
#
# Under torch.compile, SDPA with dropout is traced through its math path. use_eager_attention
# keeps the fused kernel at the cost of a graph break per layer; this op keeps it without one.
# torch.library custom ops are opaque to the compiler, so the op runs SDPA's own fused kernel
# with dropout. Its backward replays the forward with the random state the forward started from
# (the same dropout mask, as torch.utils.checkpoint does) and differentiates that; torch has no
# public SDPA backward that takes a mask's random state, hence the replay.


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _sdpa_seq_major(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
                    scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout_p, scale=scale
    ).transpose(1, 2)


# The ops take and return [B, S, H, D], the layout of the projections' outputs and of what
# transformers' attention functions return. SDPA's fused CUDA kernels write outputs and
# gradients in their inputs' memory layout, so the .contiguous() calls below copy nothing there;
# in [B, H, S, D] they copied four tensors a layer, and an H100's step took 63.2 ms instead of 56.1.
#
# Both ops read or set the generator's state on the host, which a CUDA graph cannot replay: a
# captured op would keep the state of the capture, and its backward would replay masks the
# forward did not draw. Tagged cudagraph_unsafe, they run between the captured parts of the graph
# (Inductor's graph partitions) under torch.compile's CUDA-graph modes. Untagged, by torch's
# source, the forward op stays in a captured part (a fallback kernel takes its inputs' device)
# while the read of its host-side state is split off, so the pair it returns crosses a partition
# boundary, which CUDA-graph trees reject: round 4's "AssertionError: <class 'tuple'>"
# (bench/RESULTS.md; the tagged ops are not yet run on a GPU).
_HOST_RNG_STATE = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("finsent::dropout_attention", mutates_args=(), tags=_HOST_RNG_STATE)
def dropout_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA with dropout, no mask, not causal, on ``[B, S, H, D]`` inputs: ``(output [B, S, H, D]
    contiguous, random state)``."""
    state = _rng_state(query.device)
    return _sdpa_seq_major(query, key, value, dropout_p, scale).contiguous(), state


@dropout_attention.register_fake
def _(query, key, value, dropout_p, scale):
    state_size = _rng_state(query.device).numel()
    return query.new_empty((*query.shape[:-1], value.shape[-1])), torch.empty(state_size, dtype=torch.uint8)


@torch.library.custom_op("finsent::dropout_attention_backward", mutates_args=(), tags=_HOST_RNG_STATE)
def dropout_attention_backward(grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               state: torch.Tensor, dropout_p: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cuda = query.device.type == "cuda"
    with torch.random.fork_rng(devices=[query.device] if cuda else [], device_type=query.device.type):
        if cuda:
            torch.cuda.set_rng_state(state, query.device)
        else:
            torch.set_rng_state(state)
        # A custom op runs below autograd; torch.func's vjp differentiates there all the same.
        _, vjp = torch.func.vjp(lambda q, k, v: _sdpa_seq_major(q, k, v, dropout_p, scale), query, key, value)
        grads = vjp(grad_output)
    return tuple(grad.contiguous() for grad in grads)


@dropout_attention_backward.register_fake
def _(grad_output, query, key, value, state, dropout_p, scale):
    return tuple(tensor.new_empty(tensor.shape) for tensor in (query, key, value))


def _dropout_attention_setup(ctx, inputs, output) -> None:
    query, key, value, ctx.dropout_p, ctx.scale = inputs
    ctx.save_for_backward(query, key, value, output[1])


def _dropout_attention_grad(ctx, grad_output, _grad_state):
    query, key, value, state = ctx.saved_tensors
    grads = dropout_attention_backward(grad_output.contiguous(), query, key, value, state, ctx.dropout_p, ctx.scale)
    return *grads, None, None


dropout_attention.register_autograd(_dropout_attention_grad, setup_context=_dropout_attention_setup)

REPLAYED_SDPA = "finsent_replayed_sdpa"


def _takes_fused_dropout_op(module, attention_mask, dropout: float, is_causal: bool | None, kwargs: dict) -> bool:
    """Whether an attention call is one the fused dropout ops below serve: dropout, no mask, not
    causal, no position bias."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)  # transformers' default
    return dropout != 0.0 and attention_mask is None and not causal and kwargs.get("position_bias") is None


def _replayed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature; the custom op where it applies (dropout, no
    mask, not causal), transformers' SDPA otherwise."""
    if not _takes_fused_dropout_op(module, attention_mask, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output, _ = dropout_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout, scale)
    return output, None


def use_replayed_attention(model: torch.nn.Module) -> None:
    """Attention with dropout as one op the compiler keeps whole (SDPA's fused kernel), its
    backward replaying the forward; measured by ``bench/train_throughput.py`` (``:replayattn``)."""
    AttentionInterface.register(REPLAYED_SDPA, _replayed_sdpa_forward)
    model.set_attn_implementation(REPLAYED_SDPA)


# ---------------------------------------------------------------- cuDNN's attention with dropout, called as its own op
#
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
    """Attention with dropout as cuDNN's fused op and its own backward (no replay) on a GPU;
    measured by ``bench/train_throughput.py`` (``:cudnnattn``)."""
    AttentionInterface.register(CUDNN_SDPA, _cudnn_sdpa_forward)
    model.set_attn_implementation(CUDNN_SDPA)


TRAINING_ATTENTION = {"replayed": use_replayed_attention, "cudnn": use_cudnn_attention}


def training_attention(setting: str, model: torch.nn.Module, compiled_on_gpu: bool) -> str:
    """The attention a masked-LM run trains with, ``"replayed"``, ``"cudnn"`` or ``"sdpa"``, for
    ``TrainConfig.mlm_attention``. ``auto`` replays where the model is compiled on a GPU (the
    Trainer's effective ``torch_compile``, off on a CPU) and its attention has dropout: there it
    measured fastest; uncompiled, SDPA already runs its fused kernel and a replay only adds a
    forward, and without dropout the compiler keeps SDPA's fused kernel itself. ``cudnn`` is
    chosen by name only until a GPU has timed it. Models whose attention is not one of
    transformers' attention functions (MPNet) keep their own."""
    takes_functions = getattr(model, "_supports_attention_backend", False)
    if setting == "auto":
        return "replayed" if compiled_on_gpu and takes_functions and _has_attention_dropout(model) else "sdpa"
    if setting in TRAINING_ATTENTION and not takes_functions:
        raise ValueError(f"mlm_attention={setting}: {type(model).__name__} does not take transformers' attention functions")
    return setting


def _has_attention_dropout(model: torch.nn.Module) -> bool:
    # transformers' attention modules pass their own ``dropout.p`` to the attention function.
    return any(isinstance(getattr(module, "dropout", None), torch.nn.Dropout) and module.dropout.p > 0
               for module in model.modules() if hasattr(module, "is_causal"))


def set_dropout(model: torch.nn.Module, probability: float) -> Callable[[], None]:
    """Every dropout layer of ``model`` drops with ``probability`` (``TrainConfig.mlm_dropout``);
    transformers' layers read it at each call, attention included. The config is left as it is,
    so a saved model keeps its own dropout. Returns a function that puts each layer's own back."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    own = [layer.p for layer in layers]
    for layer in layers:
        layer.p = probability

    def restore() -> None:
        for layer, p in zip(layers, own):
            layer.p = p

    return restore


# ---------------------------------------------------------------- the residual stream in the autocast dtype
#
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
    """Under autocast, every layer norm of ``model`` returns the autocast dtype instead of float32
    (``TrainConfig.mlm_bf16_residual``); outside autocast nothing changes. Returns the hooks'
    handles, to remove them after training."""
    return [module.register_forward_hook(_layer_norm_output_in_autocast_dtype)
            for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]


# ---------------------------------------------------------------- float8 linear layers


def float8_unsupported(device: torch.device | str) -> str | None:
    """Why float8 training cannot run on ``device``, or None. On a CPU it runs, emulated (slowly)."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install 'finsent[float8]')"
    device = torch.device(device)
    if device.type == "cuda" and (capability := torch.cuda.get_device_capability(device)) < (8, 9):
        return f"this GPU (compute capability {capability}) has no float8 tensor cores; 8.9+ needed (H100: 9.0)"
    return None


def use_float8_linears(model: torch.nn.Module) -> int:
    """Trains the encoder's linear layers with float8 matrix products: torchao's
    ``convert_to_float8_training``, tensorwise dynamic scaling (e4m3 forward, e5m2 gradients),
    float32 master weights, same parameters and state-dict keys. The MLM head is left alone:
    on ``B * k`` rows its products are small. Returns how many layers were converted."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    def fits(module: torch.nn.Module, _name: str) -> bool:  # float8 products need dimensions divisible by 16
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    encoder = getattr(model, model.base_model_prefix)
    convert_to_float8_training(encoder, module_filter_fn=fits)
    return sum(isinstance(module, Float8Linear) for module in encoder.modules())


def plain_linears(model: torch.nn.Module) -> None:
    """Undoes :func:`use_float8_linears`: every float8 layer becomes an ``nn.Linear`` holding the
    same parameters, so evaluation and the saved model are in full precision. Written here
    because torchao converts one way only."""
    from torchao.float8.float8_linear import Float8Linear

    for name, module in list(model.named_modules()):
        if isinstance(module, Float8Linear):
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            model.set_submodule(name, plain)

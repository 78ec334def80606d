"""The masked-LM step of ``adapt_mlm`` on packed blocks: a static number of predictions
per row, no attention mask, the vocabulary head applied to the masked positions only, and,
compiled on a GPU, attention with dropout as one op that keeps SDPA's fused kernel. On an
H100 this step trains bert-base at 1.86x the eager Hugging Face loop (bench/RESULTS.md).

* :class:`StaticMaskCollator` masks exactly ``k = round(rate * block)`` positions of each
  row (BERT's ``max_predictions_per_seq``), so every shape is static: a compiled step never
  recompiles and never waits on the host for the size of a boolean mask.
* ``PackedBertForMaskedLM`` / ``PackedMPNetForMaskedLM`` are transformers' own masked-LM
  models (same weights, same state-dict keys) whose ``forward`` also takes
  ``masked_positions`` and ``masked_labels`` and then returns only the loss, computed on
  ``B * k`` rows instead of ``B * S``. Without them it is the parent's ``forward``. Being
  the model's own ``forward``, the loss runs inside whatever wraps the model: the Trainer's
  ``torch.compile``, DistributedDataParallel under torchrun, autocast. transformers computes
  the head over every position (``BertForMaskedLM(labels=...)``); at bert-base that is about
  a fifth of the model's FLOPs, 85 % of them on positions with no label.
* :func:`keep_attention_in_bf16` lets attention that falls back to SDPA's math path stay in bf16.
* :func:`use_replayed_attention` runs attention with dropout as the custom op
  ``finsent::dropout_attention``, opaque to the compiler, whose backward replays the forward's
  dropout mask; :func:`replays_attention` says where the trainer uses it.

Levers not yet timed on a GPU live in ``bench/mlm_levers.py``, not here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, BertForMaskedLM, MPNetForMaskedLM
from transformers.activations import gelu
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import MaskedLMOutput


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
    no attention mask is passed and SDPA may take a fused kernel. Only here: the parent's
    ``forward`` (evaluation, Hugging Face's collator) stays as transformers wrote it.

    Each model class defines ``head_features(hidden)``: its masked-LM head up to the vocabulary
    projection (which is tied to the embeddings)."""

    base_model_prefix: str

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
        return self.get_output_embeddings()(features)


class PackedBertForMaskedLM(_MaskedPositionsLoss, BertForMaskedLM):
    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions.transform(hidden)


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


# ---------------------------------------------------------------- attention with dropout, opaque to the compiler
#
# Under torch.compile, SDPA with dropout is traced through its math path (the fused flash / cuDNN
# kernels draw their dropout masks in ways the compiler does not trace). torch.library custom ops
# are opaque to the compiler, so this op runs SDPA's own fused kernel with dropout, without a graph
# break. Its backward replays the forward with the random state the forward started from (the same
# dropout mask, as torch.utils.checkpoint does) and differentiates that; torch has no public SDPA
# backward that takes a mask's random state, hence the replay. On an H100 the compiled step took
# 56.1 ms with it against 62.1 ms with transformers' SDPA traced by the compiler (1.86x against
# 1.68x the eager baseline, bench/RESULTS.md).


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
    """Whether an attention call is one the fused dropout op serves: dropout, no mask, not
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
    backward replaying the forward. Registered in this process only: put the model's own
    ``config._attn_implementation`` back before saving it."""
    AttentionInterface.register(REPLAYED_SDPA, _replayed_sdpa_forward)
    model.set_attn_implementation(REPLAYED_SDPA)


def replays_attention(model: torch.nn.Module, compiled_on_gpu: bool) -> bool:
    """Whether masked-LM training runs ``model``'s attention as the replayed op: where the model
    is compiled on a GPU (the Trainer's effective ``torch_compile``, off on a CPU), its attention
    has dropout, and it takes transformers' attention functions. There it measured fastest;
    uncompiled, SDPA already runs its fused kernel and a replay only adds a forward, and without
    dropout the compiler keeps SDPA's fused kernel itself. Models whose attention is not one of
    transformers' attention functions (MPNet) keep their own."""
    takes_functions = getattr(model, "_supports_attention_backend", False)
    return bool(compiled_on_gpu and takes_functions and _has_attention_dropout(model))


def _has_attention_dropout(model: torch.nn.Module) -> bool:
    # transformers' attention modules pass their own ``dropout.p`` to the attention function.
    return any(isinstance(getattr(module, "dropout", None), torch.nn.Dropout) and module.dropout.p > 0
               for module in model.modules() if hasattr(module, "is_causal"))

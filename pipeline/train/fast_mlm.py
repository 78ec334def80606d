"""Fast masked-LM training step for BERT: packed full blocks with no attention mask,
a static number of predictions per row, the MLM head applied to those positions only,
bf16 autocast, fused AdamW and torch.compile of forward + loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

TrainStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def num_predictions(seq_len: int, rate: float = 0.15) -> int:
    """BERT's ``max_predictions_per_seq``: how many positions each row predicts."""
    return max(1, round(rate * seq_len))


class StaticMaskCollator:
    """BERT masking on exactly ``k = round(rate * seq_len)`` non-special positions per row:
    80 % become [MASK], 10 % a random token, 10 % stay as they are.

    Takes packed blocks ``[B, S]`` and returns ``input_ids`` (masked), ``masked_positions``
    ``[B, k]`` and ``masked_labels`` ``[B, k]`` (the original tokens there). A fixed k keeps
    every shape static, so a compiled step neither recompiles nor waits on the host the way
    boolean indexing of a variable-size mask would."""

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

    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        batch, seq_len = input_ids.shape
        k = num_predictions(seq_len, self.rate)
        eligible = ~torch.isin(input_ids, self.special_token_ids)
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


def mlm_loss(
    model: BertForMaskedLM,
    input_ids: torch.Tensor,
    masked_positions: torch.Tensor,
    masked_labels: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy over the k masked positions of each row.

    Blocks are full (no padding), so no attention mask is passed and SDPA may take its
    flash kernel; the vocabulary projection runs on ``B * k`` rows instead of ``B * S``."""
    hidden = model.bert(input_ids=input_ids).last_hidden_state
    index = masked_positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))
    logits = model.cls(hidden.gather(1, index))
    return F.cross_entropy(logits.flatten(0, 1).float(), masked_labels.flatten())


def fused_adamw(model: torch.nn.Module, lr: float = 5e-5, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with the single-kernel fused implementation (CUDA and CPU)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


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


def use_eager_attention(model: BertForMaskedLM) -> None:
    """Runs the model's attention outside the compiled graph, as plain SDPA.

    Under ``torch.compile`` attention with dropout takes SDPA's math path (the fused
    flash / cuDNN kernels draw their dropout masks in ways the compiler does not trace);
    left eager, SDPA keeps a fused kernel with dropout, at the cost of one graph break per
    layer. Which wins is measured by ``bench/train_throughput.py`` (``:eagerattn``)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(EAGER_SDPA, torch.compiler.disable(sdpa_attention_forward))
    model.set_attn_implementation(EAGER_SDPA)


def make_train_step(
    model: BertForMaskedLM,
    optimizer: torch.optim.Optimizer,
    compile: bool,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    mode: str | None = None,
) -> TrainStep:
    """Returns ``step(input_ids, masked_positions, masked_labels) -> loss`` that runs forward,
    backward and an optimizer step. The loss comes back as a detached device tensor: reading
    it (``float(loss)``) syncs with the device, so do that outside the hot loop.

    ``mode`` is the torch.compile mode; by default "max-autotune-no-cudagraphs" on CUDA and
    torch's default elsewhere. "reduce-overhead" / "max-autotune" add CUDA graphs. On CUDA
    this also calls ``keep_attention_in_bf16``, which changes process-wide backend flags."""
    device_type = next(model.parameters()).device.type
    if device_type == "cuda":
        keep_attention_in_bf16()
    if mode is None:
        mode = "max-autotune-no-cudagraphs" if device_type == "cuda" else "default"
    use_cudagraphs = compile and device_type == "cuda" and mode in CUDAGRAPH_MODES

    def forward_loss(input_ids: torch.Tensor, masked_positions: torch.Tensor, masked_labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return mlm_loss(model, input_ids, masked_positions, masked_labels)

    if compile:
        forward_loss = torch.compile(forward_loss, mode=mode)

    def step(input_ids: torch.Tensor, masked_positions: torch.Tensor, masked_labels: torch.Tensor) -> torch.Tensor:
        if use_cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = forward_loss(input_ids, masked_positions, masked_labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # A CUDA-graph output is overwritten by the next replay; keep a copy.
        return loss.detach().clone() if use_cudagraphs else loss.detach()

    return step

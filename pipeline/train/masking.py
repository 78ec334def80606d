"""What masked-LM training sees: texts packed into full blocks and BERT's
80/10/10 masking, each batch's masks drawn from its own numbered generator."""

from __future__ import annotations

import hashlib
import os

import torch


def group_texts(token_lists: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenates tokenised texts and cuts them into full blocks: no padding."""
    flat = [token for tokens in token_lists for token in tokens]
    usable = len(flat) // block_size * block_size
    return [flat[i : i + block_size] for i in range(0, usable, block_size)]


class NumberedBatchMasks:
    """Wraps a masking collator (one that draws from its ``generator``) so that
    batch number ``n`` of this process is masked from a generator seeded by
    ``(seed, rank, n)``: the masks then depend on where a batch is in the run,
    not on what drew random numbers before it.

    Why not torch's global RNG, which a checkpoint saves and a resume restores:
    a resumed Trainer collates its first batch before it restores that state, and
    reads one batch ahead, so the checkpoint's state was saved after the next
    batch had drawn its masks. Masks from the global RNG therefore differ from an
    uncut run's from the first step after a resume on. Set ``next_batch`` to the
    resumed step's batch number before training."""

    def __init__(self, collator, seed: int) -> None:
        self.collator = collator
        self.seed = seed
        self.rank = int(os.environ.get("RANK", "0"))
        self.next_batch = 0

    def __call__(self, examples):
        key = f"{self.seed}/{self.rank}/{self.next_batch}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        self.collator.generator = torch.Generator().manual_seed(seed)
        self.next_batch += 1
        return self.collator(examples)


def make_mlm_collator(tokenizer, mlm_probability: float, seed: int | None = None):
    """BERT's masking: ``mlm_probability`` of the tokens are picked; of those 80 %
    become [MASK], 10 % a random token, 10 % stay. ``seed=None`` draws from
    torch's global RNG (or from a ``generator`` set on it, as ``NumberedBatchMasks``
    does for training); a seed gives the collator its own generator."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=mlm_probability, mask_replace_prob=0.8, random_replace_prob=0.1, seed=seed)

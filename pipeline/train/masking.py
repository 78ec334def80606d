"""What masked-LM training sees: texts packed into full blocks, BERT's
80/10/10 masking on WordPiece tokens or whole words, and next-sentence pairs
for the original ``mlm+nsp`` objective."""

from __future__ import annotations

import functools
import hashlib
import os
import random

import torch

from pipeline.data.sources import split_sentences


def group_texts(token_lists: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenates tokenised texts and cuts them into full blocks: no padding."""
    flat = [token for tokens in token_lists for token in tokens]
    usable = len(flat) // block_size * block_size
    return [flat[i : i + block_size] for i in range(0, usable, block_size)]


def continuation_table(tokenizer) -> torch.Tensor:
    """A bool per token id: True for WordPiece continuation pieces (``##xx``)."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None) or "##"
    table = torch.zeros(max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1), dtype=torch.bool)
    for token, index in tokenizer.get_vocab().items():
        if token.startswith(prefix) and len(token) > len(prefix):
            table[index] = True
    if not table.any():
        raise ValueError(f"whole-word masking needs a WordPiece vocabulary with {prefix!r} pieces; this tokenizer has none")
    return table


@functools.cache
def _whole_word_collator_class():
    from transformers import DataCollatorForLanguageModeling

    class WholeWordMaskCollator(DataCollatorForLanguageModeling):
        """Masks whole words: a word is a token and the ``##`` pieces after it, as in
        Google's original whole-word-masking BERT. Each word start is picked with
        ``mlm_probability`` and its pieces follow it; every picked token then gets
        the 80/10/10 treatment ([MASK] / random token / unchanged).

        Written here because transformers 5 dropped ``DataCollatorForWholeWordMask``
        and its ``whole_word_mask=True`` flag (a) forces 100 % [MASK], dropping
        80/10/10, (b) finds words from character offsets, so punctuation sticks
        to the word before it ("profit" + "."), and (c) needs ``offset_mapping``
        carried through block packing. Word starts from ``##`` need only the ids.
        """

        def __post_init__(self):
            super().__post_init__()
            self._continuation = continuation_table(self.tokenizer)
            self._special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

        def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
            labels = inputs.clone()
            special = torch.isin(inputs, self._special_ids)
            if special_tokens_mask is not None:
                special |= special_tokens_mask.bool()
            continuation = self._continuation[inputs.clamp(0, len(self._continuation) - 1)] & ~special
            # A piece with no word start before it in this block (block start, or right
            # after [CLS]/[SEP]) begins a word of its own.
            after_special = torch.roll(special, 1, dims=1)
            after_special[:, 0] = True
            continuation &= ~after_special
            starts = ~continuation & ~special
            word_ids = torch.cumsum(starts.long(), dim=1)  # pieces share their start's id; ids start at 1
            picked = torch.bernoulli(starts.float() * self.mlm_probability, generator=self.generator).bool()
            picked_words = torch.zeros(inputs.shape[0], inputs.shape[1] + 1, dtype=torch.bool)
            # Each word id has exactly one start; non-starts write False into the unused slot 0.
            picked_words.scatter_(1, torch.where(starts, word_ids, 0), picked & starts)
            masked = picked_words.gather(1, word_ids) & ~special
            labels[~masked] = -100

            replaced = torch.bernoulli(torch.full(labels.shape, self.mask_replace_prob), generator=self.generator).bool()
            replaced &= masked
            inputs[replaced] = self.tokenizer.mask_token_id
            if self.random_replace_prob > 0 and self.mask_replace_prob < 1:
                scaled = self.random_replace_prob / (1 - self.mask_replace_prob)
                randomised = torch.bernoulli(torch.full(labels.shape, scaled), generator=self.generator).bool()
                randomised &= masked & ~replaced
                words = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long, generator=self.generator)
                inputs[randomised] = words[randomised]
            return inputs, labels

    return WholeWordMaskCollator


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


def make_mlm_collator(tokenizer, mlm_probability: float, whole_word: bool = False, seed: int | None = None):
    """BERT's masking: ``mlm_probability`` of the tokens (or of the words) are
    picked; of those 80 % become [MASK], 10 % a random token, 10 % stay.
    ``seed=None`` draws from torch's global RNG (or from a ``generator`` set on
    it, as ``NumberedBatchMasks`` does for training); a seed gives the collator
    its own generator."""
    from transformers import DataCollatorForLanguageModeling

    cls = _whole_word_collator_class() if whole_word else DataCollatorForLanguageModeling
    return cls(tokenizer, mlm_probability=mlm_probability, mask_replace_prob=0.8, random_replace_prob=0.1, seed=seed)


# ---------------------------------------------------------------- next-sentence pairs

def split_documents(texts: list[str], tokenizer, max_tokens: int) -> list[list[list[int]]]:
    """Each text as a list of tokenised sentences (no special tokens); sentences
    longer than ``max_tokens`` are cut into pieces."""
    owners, sentences = [], []
    for i, text in enumerate(texts):
        for sentence in split_sentences(text):
            owners.append(i)
            sentences.append(sentence)
    encoded = tokenizer(sentences, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if sentences else []
    documents: dict[int, list[list[int]]] = {}
    for owner, ids in zip(owners, encoded):
        for start in range(0, len(ids), max_tokens):
            documents.setdefault(owner, []).append(ids[start : start + max_tokens])
    return [documents[i] for i in sorted(documents)]


def build_nsp_pairs(
    documents: list[list[list[int]]], max_tokens: int, rng: random.Random, continuation: torch.Tensor | None = None,
) -> list[tuple[list[int], list[int], int]]:
    """BERT's next-sentence pairs ``(a, b, label)``; label 0: ``b`` is the actual
    next segment, 1: ``b`` is a random segment of another document.

    After Google's ``create_pretraining_data.py``: sentences are gathered until
    they fill ``max_tokens``; segment A is the first 1..n-1 of them, and with
    probability 1/2 B is the rest, else a run of sentences from a random other
    document (then the unused sentences start the next chunk). A chunk of one
    sentence is split at a random word start (``continuation`` marks ``##``
    pieces) so that single-sentence texts give next-segment pairs too. Too long
    pairs lose tokens at the front of A or the end of B, so A+B stays contiguous.
    """
    pairs: list[tuple[list[int], list[int], int]] = []
    for d, doc in enumerate(documents):
        chunk: list[list[int]] = []
        length, i = 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            i += 1
            if i < len(doc) and length < max_tokens:
                continue
            rest: list[list[int]]
            if len(chunk) >= 2:
                cut = rng.randint(1, len(chunk) - 1)
                a = [t for sentence in chunk[:cut] for t in sentence]
                rest = chunk[cut:]
            else:
                tokens = chunk[0]
                cuts = [k for k in range(1, len(tokens)) if continuation is None or not bool(continuation[tokens[k]])]
                if not cuts:
                    chunk, length = [], 0
                    continue
                cut = rng.choice(cuts)
                a, rest = tokens[:cut], [tokens[cut:]]
            if len(documents) > 1 and rng.random() < 0.5:
                other = rng.randrange(len(documents) - 1)
                other += other >= d
                target = max(1, max_tokens - len(a))
                b: list[int] = []
                for sentence in documents[other][rng.randrange(len(documents[other])) :]:
                    b.extend(sentence)
                    if len(b) >= target:
                        break
                label = 1
                if len(chunk) >= 2:
                    i -= len(rest)  # put the unused sentences back
            else:
                b = [t for sentence in rest for t in sentence]
                label = 0
            while len(a) + len(b) > max_tokens:
                if len(a) > len(b):
                    del a[0]
                else:
                    b.pop()
            pairs.append((a, b, label))
            chunk, length = [], 0
    return pairs


def encode_pair(a: list[int], b: list[int], cls_id: int, sep_id: int) -> dict:
    return {
        "input_ids": [cls_id, *a, sep_id, *b, sep_id],
        "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
    }

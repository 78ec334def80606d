"""Token counts under the configured base model's tokenizer, for the length
expectations: how many texts the model would see cut at its max length."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.bases import resolve_base_model

_BATCH = 1000


def load_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(base_model))


def token_counts(texts: Sequence[str], tokenizer) -> list[int]:
    """Tokens per text, without special tokens; missing texts count 0."""
    counts: list[int] = []
    for start in range(0, len(texts), _BATCH):
        batch = [t if isinstance(t, str) else "" for t in texts[start:start + _BATCH]]
        counts.extend(len(ids) for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
    return counts


def content_tokens(tokenizer, max_length: int) -> int:
    """Tokens of text that fit in ``max_length`` once [CLS]/[SEP] are added."""
    return max_length - tokenizer.num_special_tokens_to_add(pair=False)

"""Token counts under the configured base model's tokenizer, for the length
expectations: how many texts the model would see cut at its max length."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.bases import resolve_base_model

_BATCH = 1000


def load_tokenizer(base_model: str) -> Tokenizer:
    """The base model's fast tokenizer, neither truncating nor padding. Read
    straight from its ``tokenizer.json`` where the folder has one: importing
    transformers costs 3 s of CPU in every curation task; a hub id or a folder
    without one goes through ``AutoTokenizer``."""
    resolved = resolve_base_model(base_model)
    path = Path(resolved) / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        from transformers import AutoTokenizer

        tokenizer = Tokenizer.from_str(AutoTokenizer.from_pretrained(resolved).backend_tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def token_counts(texts: Sequence[str], tokenizer: Tokenizer) -> list[int]:
    """Tokens per text, without special tokens; missing texts count 0."""
    counts: list[int] = []
    for start in range(0, len(texts), _BATCH):
        batch = [t if isinstance(t, str) else "" for t in texts[start:start + _BATCH]]
        counts.extend(len(encoding.ids) for encoding in tokenizer.encode_batch(batch, add_special_tokens=False))
    return counts


def content_tokens(tokenizer: Tokenizer, max_length: int) -> int:
    """Tokens of text that fit in ``max_length`` once [CLS]/[SEP] are added."""
    return max_length - tokenizer.num_special_tokens_to_add(is_pair=False)

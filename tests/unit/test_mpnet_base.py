"""A base of another architecture than BERT (MPNet, as the packaged
all-mpnet-base-v2): no token type ids, RoBERTa-style positions. It takes
masked-LM adaptation, fine-tunes with the mean-pooling head, exports to ONNX
with parity, and serves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_train_config


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory, ingested) -> Path:
    from transformers import MPNetConfig, MPNetForMaskedLM, MPNetTokenizer

    from pipeline.data.ingest import load_split
    from tests.tiny_models import train_wordpiece_tokenizer

    texts = load_split(ingested.labeled_dir, "train")["text"].tolist()
    wordpiece = train_wordpiece_tokenizer(texts, 1500, 64)
    tokenizer = MPNetTokenizer(
        tokenizer_object=wordpiece.backend_tokenizer, model_max_length=64, bos_token="[CLS]", eos_token="[SEP]",
        sep_token="[SEP]", cls_token="[CLS]", unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]",
    )
    config = MPNetConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        # positions start after the padding index, as in RoBERTa
        max_position_embeddings=64 + tokenizer.pad_token_id + 2, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-mpnet")
    MPNetForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_an_mpnet_base_fine_tunes_exports_with_parity_and_serves(tmp_path, ingested, tiny_mpnet):
    from transformers import AutoModelForSequenceClassification

    from pipeline.data.ingest import load_split
    from pipeline.config import ReleaseConfig
    from pipeline.export.onnx import export_onnx
    from pipeline.export.variants import build_and_bless
    from pipeline.train.evaluate import label_ids
    from pipeline.train.model import load_classifier, predict_logits
    from pipeline.train.classify import finetune
    from pipeline.train.mlm import adapt_mlm
    from pipeline.train.pooling import MeanPoolMPNetForSequenceClassification
    from serving.model import OnnxClassifier

    cfg = tiny_train_config(tiny_mpnet).model_copy(update={"epochs": 1})
    train, validation = load_split(ingested.labeled_dir, "train"), load_split(ingested.labeled_dir, "validation")
    adapted = adapt_mlm(str(tiny_mpnet), train["text"].tolist(), validation["text"].tolist(), tmp_path / "mlm", cfg)
    assert adapted.perplexity_adapted is not None and adapted.steps == cfg.mlm_steps
    result = finetune(adapted.model_dir, train, validation, tmp_path / "ft", cfg)
    model_dir = Path(result["model_dir"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert isinstance(reloaded, MeanPoolMPNetForSequenceClassification)  # the default pooling, as the base was trained
    # The saved folder carries the head's code: transformers alone loads it, as the registered MLflow model does.
    load = ("import sys; from transformers import AutoModelForSequenceClassification as Auto; "
            "print(type(Auto.from_pretrained(sys.argv[1], trust_remote_code=True)).__name__)")
    alone = subprocess.run([sys.executable, "-c", load, str(model_dir)], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert alone.stdout.strip().splitlines()[-1] == "MeanPoolMPNetForSequenceClassification"

    onnx_dir = export_onnx(model_dir, tmp_path / "onnx", 64)
    served = OnnxClassifier(onnx_dir, providers=["CPUExecutionProvider"])
    assert served.input_names == {"input_ids", "attention_mask"}
    test = load_split(ingested.labeled_dir, "test")
    texts, y = test["text"].tolist(), label_ids(test["label"])
    model, tokenizer = load_classifier(str(model_dir))
    reference = predict_logits(model, tokenizer, texts, 64)
    budgets = ReleaseConfig().budgets
    # Every variant builds for this architecture too, and the plain export is blessed.
    folders, blessings = build_and_bless(model_dir, onnx_dir, tmp_path / "variants", reference, texts, y, budgets)
    assert set(blessings) == {"fp32", "fp32-optimized", "int8", "fp16"}
    assert blessings["fp32"].blessed and blessings["fp32"].label_flips == 0 and blessings["fp32"].max_abs_diff < 1e-4
    assert served.logits(["Operating profit rose to EUR 13.1 mn ."]).shape == (1, 3)

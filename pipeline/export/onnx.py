"""Export to ONNX (the fp32 variant) with dynamic batch and sequence axes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from serving.model import MANIFEST, manifest_checksums

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_FILE = "model.onnx"


def _export(module: torch.nn.Module, tokenizer, path: Path, output: str, max_length: int) -> None:
    """``module`` to ONNX (weights inline) with dynamic batch and sequence axes, fed as the tokenizer's output."""
    example = tokenizer(["Profit rose.", "Net sales fell by 5 % in the quarter ."], padding=True, return_tensors="pt")
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_length)
    names = [name for name in INPUTS if name in example]
    torch.onnx.export(
        module, (), kwargs={name: example[name] for name in names}, f=str(path), input_names=names,
        output_names=[output], external_data=False, dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
    )


def export_onnx(hf_dir: Path, out_dir: Path, max_length: int, model_name: str = "", model_version: str = "") -> Path:
    """Writes ``model.onnx`` (weights inline), ``tokenizer.json`` and the serving manifest to ``out_dir``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pipeline.train.pooling  # noqa: F401  (registers the mean-pooling head with the Auto classes)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    _export(model, tokenizer, out_dir / ONNX_FILE, "logits", max_length)
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    (out_dir / MANIFEST).write_text(json.dumps({
        "onnx_file": ONNX_FILE, "labels": labels, "max_length": max_length,
        "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
        "model_name": model_name, "model_version": model_version, "variant": "fp32",
        "sha256": manifest_checksums(out_dir, ONNX_FILE),
    }, indent=2))
    return out_dir


class _MeanPooledEncoder(torch.nn.Module):
    """The classifier's encoder, its last hidden states mean-pooled over the real tokens."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def export_encoder(hf_dir: Path, path: Path, max_length: int) -> Path:
    """Writes the classifier's encoder to ``path`` as ONNX (output ``embeddings``:
    mean-pooled last hidden states; the classifier's tokenizer feeds it). The
    monitor's embedding drift runs it with ONNX Runtime, so its daily tasks need
    neither torch nor transformers."""
    from pipeline.train.model import load_classifier

    model, tokenizer = load_classifier(str(hf_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    _export(_MeanPooledEncoder(model.base_model.eval()).eval(), tokenizer, path, "embeddings", max_length)
    return path

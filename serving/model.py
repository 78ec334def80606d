"""An exported classifier folder (model.onnx, tokenizer.json, serving.json)
run with onnxruntime: the one scoring path of the API and the monitor."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

MANIFEST = "serving.json"


@dataclass(frozen=True)
class Prediction:
    label: str
    scores: dict[str, float]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# On 2 CPU cores the exported graph (attention unfused) runs Reuters sentences at 147-149 texts/s in
# batches of 1-4 and at 89-98 in batches of 16-64: padding costs more than batching saves
# (bench/RESULTS.md, "Monitor"). Other providers keep large batches until a GPU has timed them.
CPU_BATCH_SIZE, DEFAULT_BATCH_SIZE = 4, 64
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


class OnnxClassifier:
    def __init__(self, model_dir: Path, providers: list[str] | None = None, batch_size: int | None = None):
        model_dir = Path(model_dir)
        manifest = json.loads((model_dir / MANIFEST).read_text())
        self.labels: list[str] = manifest["labels"]
        self.max_length: int = manifest["max_length"]
        self.name: str = manifest.get("model_name", "unknown")
        self.version: str = str(manifest.get("model_version", "unknown"))
        self.batch_size = batch_size
        self.model_dir = model_dir
        self.onnx_sha256 = file_sha256(model_dir / manifest["onnx_file"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(pad_id=manifest["pad_token_id"], pad_token=manifest["pad_token"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(model_dir / manifest["onnx_file"]), options, providers=providers or ort.get_available_providers()
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        if self.batch_size is None:
            on_gpu = bool(GPU_PROVIDERS & set(self.session.get_providers()))
            self.batch_size = DEFAULT_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE

    def logits(self, texts: list[str]) -> np.ndarray:
        """Logits in input order; batches are length-sorted to keep padding small."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            index = order[start : start + self.batch_size]
            encodings = self.tokenizer.encode_batch([texts[i] for i in index])
            feeds = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            out[index] = self.session.run(["logits"], {k: v for k, v in feeds.items() if k in self.input_names})[0]
        return out

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Softmax probabilities in input order, columns in ``self.labels`` order."""
        return _softmax(self.logits(texts))

    def predict(self, texts: list[str]) -> list[Prediction]:
        probs = self.probabilities(texts)
        return [
            Prediction(label=self.labels[int(row.argmax())], scores=dict(zip(self.labels, map(float, row))))
            for row in probs
        ]

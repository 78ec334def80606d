"""An exported classifier folder (model.onnx, tokenizer.json, serving.json)
run with onnxruntime: the one scoring path of the API and the monitor."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from serving.errors import ModelLoadError

MANIFEST = "serving.json"
log = logging.getLogger(__name__)


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


def manifest_checksums(folder: Path, onnx_file: str) -> dict[str, str]:
    """The sha256 of the files the manifest vouches for (it cannot hold its own)."""
    return {name: file_sha256(folder / name) for name in (onnx_file, "tokenizer.json")}


def verify_checksums(folder: Path, expected: dict[str, str], source: str, hashed: dict[str, str] | None = None) -> None:
    """Refuses a folder whose files differ from ``expected`` (name → sha256), naming the first that does.
    ``hashed`` keeps the digests computed, so a second check of the same files reads none again."""
    hashed = {} if hashed is None else hashed
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; {source} lists it with sha256 {digest[:16]}…")
        if name not in hashed:
            hashed[name] = file_sha256(path)
        actual = hashed[name]
        if actual != digest:
            raise ModelLoadError(
                f"{path} has sha256 {actual[:16]}…, but {source} recorded {digest[:16]}…: refusing to load a file "
                "that changed after it was blessed")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# On 2 CPU cores the exported graph (attention unfused) runs Reuters sentences at 147-149 texts/s in
# batches of 1-4 and at 89-98 in batches of 16-64: padding costs more than batching saves
# (bench/RESULTS.md, "Monitor"). Other providers keep large batches until a GPU has timed them.
CPU_BATCH_SIZE, DEFAULT_BATCH_SIZE = 4, 64
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


class OnnxClassifier:
    """``expected_sha256`` (file name → sha256, from the registry) is checked
    before anything is loaded, as is the manifest's own record of the model and
    tokenizer files. A GPU provider asked for but not given is an error unless
    ``allow_provider_fallback``: ONNX Runtime itself only logs it."""

    def __init__(self, model_dir: Path, providers: list[str] | None = None, batch_size: int | None = None,
                 expected_sha256: dict[str, str] | None = None, allow_provider_fallback: bool = False):
        model_dir = Path(model_dir)
        manifest = json.loads((model_dir / MANIFEST).read_text())
        hashed: dict[str, str] = {}
        if expected_sha256:
            verify_checksums(model_dir, expected_sha256, "the registry", hashed)
        verify_checksums(model_dir, manifest.get("sha256", {}), f"{model_dir / MANIFEST}", hashed)
        self.labels: list[str] = manifest["labels"]
        self.max_length: int = manifest["max_length"]
        self.name: str = manifest.get("model_name", "unknown")
        self.version: str = str(manifest.get("model_version", "unknown"))
        self.variant: str = manifest.get("variant", "fp32")
        self.batch_size = batch_size
        self.model_dir = model_dir
        onnx_path = model_dir / manifest["onnx_file"]
        self.onnx_sha256 = hashed.get(manifest["onnx_file"]) or file_sha256(onnx_path)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(pad_id=manifest["pad_token_id"], pad_token=manifest["pad_token"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        requested = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=requested)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ModelLoadError(f"{onnx_path} is not a loadable ONNX model: {err}") from err
        self.providers: list[str] = self.session.get_providers()
        asked_gpu = GPU_PROVIDERS & set(requested)
        self.provider_fallback = bool(asked_gpu) and not asked_gpu & set(self.providers)
        if self.provider_fallback:
            message = (f"asked for {', '.join(sorted(asked_gpu))} but ONNX Runtime runs {onnx_path.name} on "
                       f"{', '.join(self.providers)} (no GPU, or an onnxruntime without it)")
            if not allow_provider_fallback:
                raise ModelLoadError(message + "; set FINSENT_SERVING__ALLOW_PROVIDER_FALLBACK=true to run on CPU anyway")
            log.warning("PROVIDER FALLBACK: %s", message)
        self.input_names = {i.name for i in self.session.get_inputs()}
        if self.batch_size is None:
            on_gpu = bool(GPU_PROVIDERS & set(self.providers))
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

"""An exported classifier folder (model.onnx, tokenizer.json, serving.json)
run with onnxruntime: the one scoring path of the API and the monitor."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from serving.errors import ModelLoadError

MANIFEST = "serving.json"
log = logging.getLogger(__name__)


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


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# On 2 CPU cores, the demo's smoothed int8 (bench/batch_padding.py): requests of 16 random PhraseBank
# sentences score 320 texts/s as one padded run, 458 one text a run, 533 sorted in groups of at most 8
# that pad <= 10 %; 1,500 Reuters sentences in bulk, sorted, 592-596 / 597-605 / 516-526 texts/s in
# batches of 8 / 16 / 64. Other providers keep large batches until a GPU has timed them.
CPU_BATCH_SIZE, DEFAULT_BATCH_SIZE = 8, 64
PAD_SLACK = 0.10
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


def session_options(threads: int | None) -> ort.SessionOptions:
    """All graph optimizations, one inter-op thread, ``threads`` intra-op threads (unset: the host's cores)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxClassifier:
    """``expected_sha256`` (file name → sha256, from the registry) is checked
    before anything is loaded, as is the manifest's own record of the model and
    tokenizer files. A GPU provider asked for but not given is an error unless
    ``allow_provider_fallback``: ONNX Runtime itself only logs it."""

    def __init__(self, model_dir: Path, providers: list[str] | None = None, batch_size: int | None = None,
                 expected_sha256: dict[str, str] | None = None, allow_provider_fallback: bool = False,
                 threads: int | None = None):
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
        # Truncated, not padded: a batch is padded to its own longest text in run_encoded.
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.no_padding()
        self.pad_id: int = manifest["pad_token_id"]
        requested = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), session_options(threads), providers=requested)
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

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated to the model's window, not padded."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def feeds(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        """BERT-style inputs for token id lists, padded to the longest."""
        width = max(map(len, ids))
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = tokens
            attention_mask[row, : len(tokens)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}

    def run_encoded(self, ids: list[list[int]]) -> np.ndarray:
        """Logits of token id lists run as one batch, padded to the longest."""
        feeds = self.feeds(ids)
        return self.session.run(["logits"], {k: v for k, v in feeds.items() if k in self.input_names})[0]

    def run_sorted(self, ids: list[list[int]]) -> np.ndarray:
        """Logits of token id lists in input order. Texts run in length order,
        in groups of at most ``batch_size`` that pad at most ``PAD_SLACK`` of
        their tokens: on CPU a padded token costs as much as a real one while a
        bigger batch gains little (bench/RESULTS.md, "Serving")."""
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        group: list[int] = []
        tokens = 0
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
            length = len(ids[i])  # the longest so far: the group's padded width
            if group and (len(group) == self.batch_size or length * (len(group) + 1) > (1 + PAD_SLACK) * (tokens + length)):
                out[group] = self.run_encoded([ids[j] for j in group])
                group, tokens = [], 0
            group.append(i)
            tokens += length
        if group:
            out[group] = self.run_encoded([ids[j] for j in group])
        return out

    def logits(self, texts: list[str]) -> np.ndarray:
        """Logits in input order; batches are length-sorted to keep padding small."""
        return self.run_sorted(self.encode(texts))

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Softmax probabilities in input order, columns in ``self.labels`` order."""
        return softmax(self.logits(texts))

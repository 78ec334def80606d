"""The registry models the monitor scores with: the champion's blessed ONNX
export through the serving code path (``serving.model.OnnxClassifier``), and
its encoder for embedding drift. Each version is downloaded once into
``<state_dir>/monitor/models`` and loaded once per process."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from pipeline import registry
from pipeline.config import Settings
from pipeline.monitor import MonitorError
from serving.model import OnnxClassifier, session_options
from serving.registry import blessed_variants, load_version


@dataclass(frozen=True)
class MonitorModel:
    alias: str
    version: str
    classifier: OnnxClassifier
    cache: Path
    tracking_uri: str
    model_name: str
    threads: int | None = None

    @property
    def onnx_sha256(self) -> str:
        return self.classifier.onnx_sha256

    def encoder(self) -> "Encoder":
        return _encoder(self.tracking_uri, self.model_name, self.version, str(self.cache), self.classifier, self.threads)


def _cache(settings: Settings) -> Path:
    return (settings.state_dir / "monitor" / "models").resolve()


@functools.lru_cache(maxsize=4)
def _classifier(tracking_uri: str, model_name: str, version: str, cache: str, variant: str | None,
                providers: tuple[str, ...], allow_provider_fallback: bool, threads: int | None) -> OnnxClassifier:
    """The served variant, checksum-verified against the registry as the API loads it."""
    found = registry.connect_uri(tracking_uri).get_model_version(model_name, version)
    return load_version(tracking_uri, found, Path(cache), variant=variant, providers=list(providers),
                        allow_provider_fallback=allow_provider_fallback, threads=threads)


def load_alias(settings: Settings, alias: str) -> MonitorModel | None:
    """The alias's exported model; None when the alias does not exist or has no ONNX export."""
    found = registry.version_by_alias(settings, alias)
    if found is None or not blessed_variants(found):
        return None
    serving = settings.serving
    classifier = _classifier(settings.tracking_uri, settings.model_name, found.version, str(_cache(settings)),
                             serving.variant, tuple(serving.providers), serving.allow_provider_fallback,
                             settings.monitor.threads)
    return MonitorModel(alias, found.version, classifier, _cache(settings), settings.tracking_uri, settings.model_name,
                        settings.monitor.threads)


def load_champion(settings: Settings) -> MonitorModel:
    champion = load_alias(settings, registry.CHAMPION)
    if champion is None:
        raise MonitorError(
            f"no champion to score with: models:/{settings.model_name}@{registry.CHAMPION} has no exported ONNX model "
            f"at {settings.tracking_uri}; run the release first (`airflow dags test release` or `finsent release`)")
    return champion


class Encoder:
    """Mean-pooled last hidden states of the champion's encoder, exported to
    ONNX once per version (the served export has the logits only) and fed by
    the classifier's own tokenizer."""

    def __init__(self, onnx_path: Path, classifier: OnnxClassifier, threads: int | None):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), session_options(threads), providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.classifier = classifier

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        ids = self.classifier.encode(texts)
        out = np.zeros((len(texts), self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        order = np.argsort([len(tokens) for tokens in ids], kind="stable")
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            feeds = self.classifier.feeds([ids[i] for i in index])
            out[index] = self.session.run(["embeddings"], {k: v for k, v in feeds.items() if k in self.input_names})[0]
        return out


@functools.lru_cache(maxsize=2)
def _encoder(tracking_uri: str, model_name: str, version: str, cache: str, classifier: OnnxClassifier,
             threads: int | None) -> Encoder:
    target = Path(cache) / f"v{version}"
    path = target / "encoder.onnx"
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target / "encoder.lock"), timeout=1800):  # the days of a parallel backfill ask together
        if not path.is_file():
            from pipeline.export.onnx import export_encoder

            found = registry.connect_uri(tracking_uri).get_model_version(model_name, version)
            hf_dir = registry.download_hf_model(found, target / "hf")
            staged = export_encoder(hf_dir, target / "encoder.onnx.partial", classifier.max_length)
            staged.replace(path)
    return Encoder(path, classifier, threads)

"""The registry models the monitor scores with: the champion's blessed ONNX
export through the serving code path (``serving.model.OnnxClassifier``), and
its encoder for embedding drift. Each version is downloaded once into
``<state_dir>/monitor/models`` and loaded once per process."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import registry
from pipeline.config import Settings
from pipeline.monitor import MonitorError
from serving.model import OnnxClassifier
from serving.registry import blessed_variants, load_version


@dataclass(frozen=True)
class MonitorModel:
    alias: str
    version: str
    classifier: OnnxClassifier
    cache: Path
    tracking_uri: str
    model_name: str

    @property
    def onnx_sha256(self) -> str:
        return self.classifier.onnx_sha256

    def encoder(self) -> "Encoder":
        return _encoder(self.tracking_uri, self.model_name, self.version, str(self.cache), self.classifier.max_length)


def _cache(settings: Settings) -> Path:
    return (settings.state_dir / "monitor" / "models").resolve()


@functools.lru_cache(maxsize=4)
def _classifier(tracking_uri: str, model_name: str, version: str, cache: str, variant: str | None,
                providers: tuple[str, ...], allow_provider_fallback: bool) -> OnnxClassifier:
    """The served variant, checksum-verified against the registry as the API loads it."""
    found = registry.connect_uri(tracking_uri).get_model_version(model_name, version)
    return load_version(tracking_uri, found, Path(cache), variant=variant, providers=list(providers),
                        allow_provider_fallback=allow_provider_fallback)


def load_alias(settings: Settings, alias: str) -> MonitorModel | None:
    """The alias's exported model; None when the alias does not exist or has no ONNX export."""
    found = registry.version_by_alias(settings, alias)
    if found is None or not blessed_variants(found):
        return None
    serving = settings.serving
    classifier = _classifier(settings.tracking_uri, settings.model_name, found.version, str(_cache(settings)),
                             serving.variant, tuple(serving.providers), serving.allow_provider_fallback)
    return MonitorModel(alias, found.version, classifier, _cache(settings), settings.tracking_uri, settings.model_name)


def load_champion(settings: Settings) -> MonitorModel:
    champion = load_alias(settings, registry.CHAMPION)
    if champion is None:
        raise MonitorError(
            f"no champion to score with: models:/{settings.model_name}@{registry.CHAMPION} has no exported ONNX model "
            f"at {settings.tracking_uri}; run the release first (`airflow dags test release` or `finsent release`)")
    return champion


class Encoder:
    """Mean-pooled last hidden states of the champion's encoder (PyTorch: the
    ONNX export has the logits only)."""

    def __init__(self, hf_dir: Path, max_length: int):
        import torch

        from pipeline.train.model import load_classifier

        self._torch = torch
        model, self.tokenizer = load_classifier(str(hf_dir))
        self.encoder = model.base_model.eval()
        self.max_length = max_length

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.encoder.config.hidden_size), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                index = order[start : start + batch_size]
                batch = self.tokenizer([texts[i] for i in index], truncation=True, max_length=self.max_length,
                                       padding=True, return_tensors="pt")
                hidden = self.encoder(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out[index] = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).numpy()
        return out


@functools.lru_cache(maxsize=2)
def _encoder(tracking_uri: str, model_name: str, version: str, cache: str, max_length: int) -> Encoder:
    found = registry.connect_uri(tracking_uri).get_model_version(model_name, version)
    target = Path(cache) / f"v{version}" / "hf"
    marker = target / ".complete"
    if not marker.is_file():
        hf_dir = registry.download_hf_model(found, target)
        marker.write_text(str(hf_dir))
    hf_dir = Path(marker.read_text())
    return Encoder(hf_dir, max_length)

"""Fetching the exported model of a registry alias (MLflow client only)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from serving.model import MANIFEST


def fetch_version(tracking_uri: str, version: ModelVersion, dest: Path) -> Path:
    """Downloads the ONNX folder logged with a registered version into
    ``dest/v<version>/``; a folder already complete there is reused."""
    artifact = version.tags.get("onnx_artifact")
    if not artifact:
        raise LookupError(f"{version.name} version {version.version} has no exported ONNX model yet")
    target = dest / f"v{version.version}"
    folder = target / artifact
    if (folder / MANIFEST).is_file():
        return folder
    mlflow.set_tracking_uri(tracking_uri)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:  # complete or absent: a half download is never reused
        mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact, dst_path=tmp)
        shutil.rmtree(target, ignore_errors=True)
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return folder


def fetch_alias(tracking_uri: str, model_name: str, alias: str, dest: Path) -> Path:
    """Downloads the ONNX folder logged with ``models:/<name>@<alias>``."""
    version = MlflowClient(tracking_uri).get_model_version_by_alias(model_name, alias)
    try:
        return fetch_version(tracking_uri, version, dest)
    except LookupError:
        raise LookupError(f"{model_name} version {version.version} (@{alias}) has no exported ONNX model yet") from None

"""Fetching the exported model of a registry alias (MLflow client only)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient


def fetch_alias(tracking_uri: str, model_name: str, alias: str, dest: Path) -> Path:
    """Downloads the ONNX folder logged with ``models:/<name>@<alias>``."""
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(model_name, alias)
    artifact = version.tags.get("onnx_artifact")
    if not artifact:
        raise LookupError(f"{model_name} version {version.version} (@{alias}) has no exported ONNX model yet")
    target = dest / f"v{version.version}"
    target.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact, dst_path=str(target)))

"""Loading a registered version's blessed ONNX variant (MLflow client only).

The release writes each version's variants once, under ``onnx/v<version>/<variant>/``
of its run, and records on the version: the blessed variants (``onnx_variants``),
the fastest blessed on CPU (``onnx_default_cpu``) and the sha256 of every file
(``sha256/<variant>/<file>``). Nothing is loaded unless its bytes match those tags."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from serving.model import GPU_PROVIDERS, MANIFEST, ModelLoadError, OnnxClassifier, verify_checksums

T = TypeVar("T")

ARTIFACT_TAG, VARIANTS_TAG, DEFAULT_CPU_TAG = "onnx_artifact", "onnx_variants", "onnx_default_cpu"
SHA_PREFIX = "sha256/"
GPU_PREFERENCE = ("fp32-optimized", "fp32")


def sha_tag(variant: str, file: str) -> str:
    return f"{SHA_PREFIX}{variant}/{file}"


def blessed_variants(version: ModelVersion) -> list[str]:
    return [v for v in version.tags.get(VARIANTS_TAG, "").split(",") if v]


def variant_checksums(version: ModelVersion, variant: str) -> dict[str, str]:
    prefix = f"{SHA_PREFIX}{variant}/"
    return {key[len(prefix):]: value for key, value in version.tags.items() if key.startswith(prefix)}


def choose_variant(version: ModelVersion, requested: str | None, providers: list[str]) -> str:
    """``requested`` if blessed; else the fastest blessed CPU variant, or on a GPU provider fp32-optimized/fp32."""
    blessed = blessed_variants(version)
    label = f"{version.name} version {version.version}"
    if not blessed or not version.tags.get(ARTIFACT_TAG):
        raise LookupError(f"{label} has no blessed ONNX variants yet: run `finsent release` (or the release DAG) for it")
    if requested:
        if requested not in blessed:
            raise LookupError(f"{label}: variant {requested!r} is not blessed (blessed: {', '.join(blessed)})")
        return requested
    if GPU_PROVIDERS & set(providers):
        return next(v for v in (*GPU_PREFERENCE, *blessed) if v in blessed)
    return version.tags.get(DEFAULT_CPU_TAG) or blessed[0]


def _download(tracking_uri: str, version: ModelVersion, artifact: str, target: Path) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # complete or absent: a half download is never reused
        mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact, dst_path=tmp)
        shutil.rmtree(target, ignore_errors=True)
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup


def _verified(tracking_uri: str, version: ModelVersion, dest: Path, variant: str | None, providers: list[str],
              open_folder: Callable[[Path, dict[str, str]], T]) -> T:
    """Opens the chosen blessed variant's folder in ``dest`` with ``open_folder``
    (which checks it against the registry's sha256s), downloading it first when
    absent; a cached copy that fails the check is fetched again once."""
    chosen = choose_variant(version, variant, providers)
    checksums = variant_checksums(version, chosen)
    if not checksums:
        raise ModelLoadError(f"{version.name} version {version.version} records no sha256 for variant {chosen!r}: "
                             "refusing to load files nothing vouches for")
    artifact = f"{version.tags[ARTIFACT_TAG]}/{chosen}"
    target = dest / f"v{version.version}" / chosen
    folder = target / Path(artifact).name
    if (folder / MANIFEST).is_file():
        try:
            return open_folder(folder, checksums)
        except ModelLoadError:  # a cached copy that changed: fetch the registry's bytes again
            pass
    _download(tracking_uri, version, artifact, target)
    return open_folder(folder, checksums)


def fetch_verified(tracking_uri: str, version: ModelVersion, dest: Path, variant: str | None = None,
                   providers: list[str] | None = None) -> Path:
    """The chosen blessed variant's folder, its files checked, without loading it (for another process)."""
    def check(folder: Path, checksums: dict[str, str]) -> Path:
        verify_checksums(folder, checksums, "the registry")
        return folder

    return _verified(tracking_uri, version, dest, variant, providers or ["CPUExecutionProvider"], check)


def load_version(tracking_uri: str, version: ModelVersion, dest: Path, variant: str | None = None,
                 providers: list[str] | None = None, allow_provider_fallback: bool = False,
                 threads: int | None = None) -> OnnxClassifier:
    """Downloads (or reuses, in ``dest``) the chosen blessed variant, verifies every
    file against the registry's sha256 tags and loads it."""
    providers = providers or ["CPUExecutionProvider"]
    return _verified(tracking_uri, version, dest, variant, providers, lambda folder, checksums: OnnxClassifier(
        folder, providers=providers, expected_sha256=checksums, allow_provider_fallback=allow_provider_fallback,
        threads=threads))


def resolve_alias(tracking_uri: str, model_name: str, alias: str) -> ModelVersion:
    """The version ``models:/<name>@<alias>`` points at now."""
    return MlflowClient(tracking_uri).get_model_version_by_alias(model_name, alias)

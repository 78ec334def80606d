"""The step cache: an unchanged re-run is free. A training run is keyed by
what decides its model: the data it reads (the labeled splits and the corpus,
and the frozen test split's digest), the code (the ``pipeline`` package's
sources and the torch/transformers versions), the resolved training config
(recipe applied, sweep included), the base model's files and the teacher's
registry version. A run with the same key that registered a version which
still exists is reused instead of training again."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mlflow import MlflowClient

from pipeline.config import Settings
from pipeline.registry import CACHE_TAG

REUSED_AT_TAG = "cache_reused_at"
HITS_TAG = "cache_hits"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the installed ``pipeline`` package
LIBRARIES = ("torch", "transformers")


@dataclass(frozen=True)
class CachedRun:
    run_id: str
    version: str  # the newest version of settings.model_name that the run registered


def _digest(root: Path, files: Iterable[Path]) -> str:
    """sha256 over files by their path under ``root`` and their bytes, streamed."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        # Name and size first: two files' bytes can never run together into a third's.
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def training_data_digest(settings: Settings) -> str:
    """The files the training reads: the labeled splits and the corpus. Not DVC's digest of ``data/``: that
    one also moves with each day's news and the monitor's output, which no training reads, so every daily
    ingest would retrain."""
    files = [p for p in settings.labeled_dir.rglob("*") if p.is_file()]
    return _digest(settings.data_dir, files + ([settings.corpus_path] if settings.corpus_path.is_file() else []))


def code_digest(package_dir: Path | None = None) -> str:
    """The package's ``.py`` files: uncommitted edits count, and no git is needed (as in the docker images)."""
    root = package_dir or PACKAGE_DIR
    return _digest(root, root.rglob("*.py"))


def folder_digest(folder: Path) -> str:
    """A model folder's files; hidden entries (download metadata) are left out."""
    return _digest(folder, (p for p in folder.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)))


def model_digest(name: str, bases_dir: Path) -> str:
    """A base (or teacher) folder's digest; a hub id that has no local folder is keyed by its name."""
    from pipeline.bases import resolve_base_model

    resolved = Path(resolve_base_model(name, bases_dir))
    return folder_digest(resolved) if resolved.is_dir() else f"hub:{name}"


def teacher_identity(settings: Settings) -> str | None:
    """A registry alias as the version it points at now (an alias that moved is another teacher); a folder by its files."""
    teacher = settings.train.teacher_model
    if teacher is None:
        return None
    if not teacher.startswith("models:/"):
        return model_digest(teacher, settings.bases_dir)
    name, _, alias = teacher.removeprefix("models:/").partition("@")
    if not alias:
        return teacher
    return f"models:/{name}/{MlflowClient(settings.tracking_uri).get_model_version_by_alias(name, alias).version}"


def _library_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def cache_inputs(settings: Settings, test_digest: str) -> dict:
    return {
        "data": training_data_digest(settings),
        "test_digest": test_digest,
        "code": code_digest(),
        "libraries": _library_versions(),
        "train": settings.train.model_dump(mode="json"),
        "base_model": model_digest(settings.train.base_model, settings.bases_dir),
        "teacher": teacher_identity(settings),
    }


def cache_key(settings: Settings, test_digest: str) -> str:
    """sha256 of ``cache_inputs``."""
    return hashlib.sha256(json.dumps(cache_inputs(settings, test_digest), sort_keys=True).encode()).hexdigest()


def find_cached_run(settings: Settings, key: str) -> CachedRun | None:
    """The newest run of ``settings.experiment`` tagged with ``key`` that registered
    a version of ``settings.model_name`` still in the registry. A run that never got
    to ``register`` (failed, or still training) is no hit: every step reopens the
    run, so MLflow shows it FINISHED long before its model exists."""
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.{CACHE_TAG} = '{key}'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        versions = client.search_model_versions(f"name = '{settings.model_name}' and run_id = '{run.info.run_id}'")
        if versions:
            return CachedRun(run.info.run_id, max((v.version for v in versions), key=int))
    return None

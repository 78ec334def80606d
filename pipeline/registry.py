"""MLflow: runs, logging, registration, aliases and lineage tags."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.config import LABELS, Settings, TrainConfig

CANDIDATE = "candidate"
CHAMPION = "champion"
ONNX_ARTIFACT_PATH = "onnx"
MODEL_CARD = "model_card.md"
LINEAGE_TAGS = ("data_digest", "test_digest", "git_commit", "config_hash")
CACHE_TAG = "cache_key"  # a training run's step-cache key (pipeline.train.cache)


def connect_uri(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def connect(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.experiment)
    return MlflowClient(settings.tracking_uri)


def git_commit(cwd: Path) -> str:
    """``git rev-parse HEAD`` in ``cwd``; "unknown" outside a repository, before its first commit or without git."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def train_config_hash(cfg: TrainConfig) -> str:
    """First 12 hex digits of the sha256 of the resolved training config's JSON."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def _flatten(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else key, inner))
        return out
    return {prefix: str(value)}


def start_training_run(settings: Settings, data_digest: str, test_digest: str, cache_key: str) -> str:
    """Creates the run every training step logs into, tagged with its step-cache key
    (``pipeline.train.cache``); returns its id."""
    import pandas as pd

    connect(settings)
    with mlflow.start_run(run_name="train") as run:
        mlflow.log_params(_flatten("", {k: v for k, v in settings.resolved().items() if k in ("train", "ingest")}))
        mlflow.log_dict(settings.resolved(), "config/resolved.json")
        if settings.data_docs_dir.is_dir():
            mlflow.log_artifacts(str(settings.data_docs_dir), "data_docs")
        if settings.recipe is not None:
            from pipeline.recipes import load_recipe

            recipe = load_recipe(settings.recipe, settings.recipes_dir)
            mlflow.log_artifact(str(recipe.path), "recipe")
            mlflow.set_tag("recipe", recipe.name)
        mlflow.set_tags({
            "data_digest": data_digest,
            "test_digest": test_digest,
            "git_commit": git_commit(settings.project_dir),
            "config_hash": train_config_hash(settings.train),
            "settings_hash": settings.config_hash(),
            CACHE_TAG: cache_key,
        })
        for split in ("train", "validation", "test"):
            # float agreement: MLflow's schema warns on integer columns that could hold missing values.
            frame = pd.read_parquet(settings.labeled_dir / f"{split}.parquet").astype({"agreement": "float64"})
            dataset = mlflow.data.from_pandas(
                frame, source=str((settings.labeled_dir / f"{split}.parquet").resolve()), targets="label",
                name=f"curated-labeled-{split}",
                # MLflow caps dataset digests at 36 characters; the full ones are tags.
                digest=(test_digest if split == "test" else data_digest)[:36],
            )
            mlflow.log_input(dataset, context=split)
        return run.info.run_id


def register_classifier(
    settings: Settings, run_id: str, model_dir: Path, model_card: Path | None = None, tags: dict[str, str] | None = None,
) -> ModelVersion:
    """Logs the fine-tuned model as a pyfunc into ``run_id`` (transformers folder
    with its tokenizer, label map and max length, signature, input example and
    model card), registers it, tags the version with its lineage and points
    ``candidate`` at it. ``tags`` override the lineage tags copied from the run."""
    import pandas as pd

    client = connect(settings)
    run = client.get_run(run_id)
    lineage = {key: run.data.tags.get(key, "") for key in LINEAGE_TAGS}
    lineage["git_commit"] = lineage["git_commit"] or git_commit(settings.project_dir)
    lineage["config_hash"] = lineage["config_hash"] or train_config_hash(settings.train)
    lineage.update(tags or {})
    with tempfile.TemporaryDirectory() as tmp:
        label_map = Path(tmp) / "label_map.json"
        label_map.write_text(json.dumps({"labels": list(LABELS), "max_length": settings.train.max_length}))
        artifacts = {"hf_model": str(model_dir), "label_map": str(label_map)}
        if model_card is not None:
            artifacts["model_card"] = str(model_card)
        # One unnamed string column: predict() takes a list of texts as well as a DataFrame with a text column.
        example = ["Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.", "Net sales fell by 5 %."]
        output = pd.DataFrame({"label": ["positive", "negative"], **{name: [1.0 / len(LABELS)] * 2 for name in LABELS}})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("sentiment_pyfunc.py")),
                artifacts=artifacts,
                signature=mlflow.models.infer_signature(example, output),
                input_example=example,
                pip_requirements=["torch", "transformers", "pandas", f"mlflow=={mlflow.__version__}"],
                metadata={"labels": list(LABELS), "max_length": settings.train.max_length, **lineage},
                registered_model_name=settings.model_name,
            )
            if model_card is not None:
                mlflow.log_artifact(str(model_card))
    name, number = settings.model_name, str(info.registered_model_version)
    for key, value in lineage.items():
        client.set_model_version_tag(name, number, key, value)
    if model_card is not None:
        from pipeline.train.model_card import card_summary

        client.update_model_version(name, number, description=card_summary(model_card.read_text(encoding="utf-8")))
    client.set_registered_model_alias(name, CANDIDATE, number)
    return client.get_model_version(name, number)


def version_by_alias(settings: Settings, alias: str) -> ModelVersion | None:
    client = connect(settings)
    try:
        return client.get_model_version_by_alias(settings.model_name, alias)
    except MlflowException:
        return None


def download_hf_model(version: ModelVersion, dest: Path) -> Path:
    """The transformers folder inside a registered pyfunc version."""
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(dest)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    return local / mlmodel["flavors"]["python_function"]["artifacts"]["hf_model"]["path"]

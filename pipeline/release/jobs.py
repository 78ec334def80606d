"""The release stage's steps: export, parity, gate, promote."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from pipeline import registry
from pipeline.config import Settings
from pipeline.data.ingest import load_split
from pipeline.release.gate import decide_promotion


class ParityError(RuntimeError):
    """The exported model disagrees with PyTorch beyond tolerance."""


def _release_dir(settings: Settings, version: str) -> Path:
    path = settings.state_dir / "release" / f"v{version}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _candidate(settings: Settings, version: str | None):
    client = registry.connect(settings)
    if version:
        return client.get_model_version(settings.model_name, version)
    found = registry.version_by_alias(settings, registry.CANDIDATE)
    if found is None:
        raise LookupError(f"registered model {settings.model_name!r} has no alias {registry.CANDIDATE!r}")
    return found


def export_candidate(settings: Settings, version: str | None = None) -> dict:
    """Exports a registered version to ONNX, checks parity on the test split,
    and logs the ONNX folder and parity figures with the version."""
    from pipeline.export.onnx import check_parity, export_onnx

    candidate = _candidate(settings, version)
    work = _release_dir(settings, candidate.version)
    hf_dir = registry.download_hf_model(candidate, work / "registered")
    onnx_dir = export_onnx(hf_dir, work / registry.ONNX_ARTIFACT_PATH, settings.train.max_length, candidate.name, candidate.version)
    parity = check_parity(hf_dir, onnx_dir, load_split(settings.labeled_dir, "test")["text"].tolist(), settings.train.max_length)
    client = registry.connect(settings)
    with mlflow.start_run(run_id=candidate.run_id):
        mlflow.log_artifacts(str(onnx_dir), registry.ONNX_ARTIFACT_PATH)
        mlflow.log_metrics({"parity_max_abs_diff": parity["max_abs_diff"], "parity_label_flips": parity["label_flips"]})
    for key, value in {"onnx_artifact": registry.ONNX_ARTIFACT_PATH, **{f"parity_{k}": v for k, v in parity.items()}}.items():
        client.set_model_version_tag(candidate.name, candidate.version, key, str(value))
    cfg = settings.release
    if parity["max_abs_diff"] > cfg.parity_max_abs_diff or parity["label_flips"] > cfg.parity_max_flips:
        raise ParityError(
            f"ONNX parity failed for version {candidate.version}: max abs logit diff {parity['max_abs_diff']:.2e} "
            f"(limit {cfg.parity_max_abs_diff:.0e}), {parity['label_flips']} label flips (limit {cfg.parity_max_flips})"
        )
    return {"version": candidate.version, "onnx_dir": str(onnx_dir), "parity": parity}


def _onnx_test_metrics(settings: Settings, version) -> dict[str, float]:
    from serving.model import OnnxClassifier
    from pipeline.train.evaluate import classification_metrics, label_ids, softmax

    test = load_split(settings.labeled_dir, "test")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path=version.tags.get("onnx_artifact", registry.ONNX_ARTIFACT_PATH), dst_path=tmp
        )
        probs = softmax(OnnxClassifier(Path(local), providers=["CPUExecutionProvider"]).logits(test["text"].tolist()))
    return classification_metrics(label_ids(test["label"]), probs, test["agreement"].to_numpy())


def gate(settings: Settings, version: str | None = None) -> dict:
    """Scores candidate and champion on the current test split with their
    exported models, decides, and records the decision on the candidate."""
    candidate = _candidate(settings, version)
    client = registry.connect(settings)
    champion = registry.version_by_alias(settings, registry.CHAMPION)
    candidate_metrics = _onnx_test_metrics(settings, candidate)
    champion_metrics = None
    if champion is not None and champion.version != candidate.version:
        champion_metrics = _onnx_test_metrics(settings, champion)
    decision = decide_promotion(candidate_metrics, champion_metrics, settings.release)
    record = {
        "candidate_version": candidate.version,
        "champion_version": champion.version if champion else None,
        "candidate_metrics": candidate_metrics,
        "champion_metrics": champion_metrics,
        **decision.to_dict(),
    }
    with mlflow.start_run(run_id=candidate.run_id):
        mlflow.log_dict(record, "release/gate_decision.json")
    client.set_model_version_tag(candidate.name, candidate.version, "gate_decision", "promote" if decision.promote else "reject")
    client.set_model_version_tag(candidate.name, candidate.version, "gate_reason", decision.reason)
    return record


def promote(settings: Settings, gate_record: dict) -> dict:
    client = registry.connect(settings)
    version = gate_record["candidate_version"]
    if gate_record["promote"]:
        client.set_registered_model_alias(settings.model_name, registry.CHAMPION, version)
    champion = registry.version_by_alias(settings, registry.CHAMPION)
    return {
        "promoted": bool(gate_record["promote"]),
        "reason": gate_record["reason"],
        "champion_version": champion.version if champion else None,
        "model_uri": f"models:/{settings.model_name}@{registry.CHAMPION}",
    }

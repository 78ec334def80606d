"""Calibration, agreement slices, reliability diagram, the model card, and
registration with lineage tags, the card and a usable pyfunc."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline import registry
from pipeline.train.evaluate import (
    agreement_slices, classification_metrics, expected_calibration_error, plot_reliability_diagram, reliability_bins,
)
from pipeline.train.model_card import ModelCardInputs, card_summary, render_model_card


def _probs(confidence: np.ndarray) -> np.ndarray:
    """Three-class rows whose top label is 0 with the given confidence."""
    rest = (1 - confidence) / 2
    return np.column_stack([confidence, rest, rest])


def _labels(correct: np.ndarray) -> np.ndarray:
    return np.where(correct, 0, 1)


def test_ece_is_zero_when_confidence_matches_accuracy_per_bin():
    confidence = np.repeat([0.5, 0.7, 0.9], 10)
    correct = np.concatenate([np.arange(10) < k for k in (5, 7, 9)])
    assert expected_calibration_error(_labels(correct), _probs(confidence)) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_sampled_calibrated_probabilities_is_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.34, 1.0, 50_000)
    correct = rng.uniform(size=confidence.size) < confidence
    assert expected_calibration_error(_labels(correct), _probs(confidence)) < 0.01


def test_ece_of_an_over_confident_model_by_hand():
    # 90 % confident, 60 % right: one bin, gap 0.3.
    confidence = np.full(10, 0.9)
    assert expected_calibration_error(_labels(np.arange(10) < 6), _probs(confidence)) == pytest.approx(0.3)
    # Bins (14/15, 1] and (8/15, 9/15]: 4 at 0.95 with 2 right (gap 0.45), 6 at 0.55 with 3 right (gap 0.05).
    confidence = np.array([0.95] * 4 + [0.55] * 6)
    correct = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    assert expected_calibration_error(_labels(correct), _probs(confidence)) == pytest.approx(0.4 * 0.45 + 0.6 * 0.05)
    bins = reliability_bins(_labels(correct), _probs(confidence))
    assert bins["count"][14] == 4 and bins["count"][8] == 6 and bins["count"].sum() == 10


def test_agreement_slices_are_nested_with_accuracy_and_macro_f1():
    y_true = np.array([0, 1, 2, 2, 1, 0, 1, 2])
    y_pred = np.array([0, 1, 2, 1, 1, 2, 0, 2])
    agreement = np.array([100, 100, 100, 75, 66, 50, 50, 75])
    slices = agreement_slices(y_true, y_pred, agreement)
    assert list(slices) == ["allagree", "agree75", "agree66", "agree50"]
    assert slices["allagree"] == {"accuracy": 1.0, "macro_f1": 1.0, "n": 3.0}
    assert slices["agree75"]["n"] == 5 and slices["agree75"]["accuracy"] == pytest.approx(4 / 5)
    assert slices["agree50"]["n"] == 8 and slices["agree50"]["accuracy"] == pytest.approx(5 / 8)
    # agree75: class 0 F1 1, class 1 F1 2/3, class 2 F1 4/5.
    assert slices["agree75"]["macro_f1"] == pytest.approx((1 + 2 / 3 + 4 / 5) / 3)
    metrics = classification_metrics(y_true, np.eye(3)[y_pred] * 0.8 + 0.2 / 3, agreement)
    assert metrics["macro_f1_agree75"] == slices["agree75"]["macro_f1"] and metrics["n_agree66"] == 6
    assert metrics["ece"] == pytest.approx(abs(0.8 + 0.2 / 3 - 5 / 8))


def test_reliability_diagram_is_written(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1, 1, 1], 200)
    path = plot_reliability_diagram(rng.integers(0, 3, 200), probs, tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


METRICS = {
    "accuracy": 0.8123, "macro_f1": 0.7712, "ece": 0.0431, "roc_auc_ovr": 0.91,
    "accuracy_allagree": 0.95, "macro_f1_allagree": 0.93, "n_allagree": 45.0,
    "accuracy_agree50": 0.8123, "macro_f1_agree50": 0.7712, "n_agree50": 97.0,
}


def _card(**overrides) -> ModelCardInputs:
    values = dict(
        model_name="finsent-sentiment", run_id="r123", base_model="sentence-transformers/all-MiniLM-L6-v2",
        mlm_decision="adapted: perplexity 12.1 < 14.3", data_digest="abc123.dir", test_digest="f00d" * 16,
        git_commit="deadbeef", config_hash="0123456789ab", train_config={"finetune_method": "lora", "max_length": 128},
        test_metrics=METRICS, labeled_source="/data/financial_phrasebank", phrasebank=True, corpus_source="/data/reuters21578",
    )
    return ModelCardInputs(**{**values, **overrides})


def test_model_card_holds_licence_digests_metrics_and_limits():
    card = render_model_card(_card())
    for text in ("CC BY-NC-SA 3.0", "non-commercial", "Malo", "Reuters-21578", "research use", "abc123.dir", "f00d" * 16,
                 "deadbeef", "0123456789ab", "sentence-transformers/all-MiniLM-L6-v2", "adapted: perplexity",
                 "| macro_f1 | 0.7712 |", "| ece | 0.0431 |", "| allagree | 45 | 0.9500 | 0.9300 |",
                 "| agree50 | 97 | 0.8123 | 0.7712 |", "Not investment advice", "English", "Finnish", "1987",
                 '"finetune_method": "lora"'):
        assert text in card, text
    other = render_model_card(_card(labeled_source="s3://bucket/labels.csv", phrasebank=False, corpus_source=None))
    assert "CC BY-NC-SA" not in other and "licence not recorded" in other and "Reuters-21578," not in other
    assert "- Base model: Apache-2.0" in card
    assert "- Base model: licence not recorded" in render_model_card(_card(base_model="/models/my-bert"))
    assert "Distillation" not in card
    distilled = render_model_card(_card(train_config={"max_length": 128, "teacher_model": "models:/teacher@champion",
                                                      "distill_weight": None, "distill_corpus_texts": 30}))
    assert "own (0.5) with the probabilities of the fine-tuned teacher `models:/teacher@champion` (0.5)" in distilled
    assert "plus 30 unlabeled corpus sentences" in distilled
    summary = card_summary(card, limit=1600)
    assert len(summary) <= 1600 and "CC BY-NC-SA 3.0" in summary and "model_card.md" in summary


def test_register_logs_card_lineage_and_a_usable_pyfunc(ingested, tiny_classifier, mlflow_server, tmp_path):
    from pipeline.train import jobs

    settings = ingested.model_copy(update={"tracking_uri": mlflow_server, "experiment": "registry-test",
                                           "model_name": "finsent-registry-test"})
    run_id = jobs.start_run(settings)["run_id"]
    evaluation = jobs.evaluate(settings, run_id, str(tiny_classifier))
    assert {"ece", "macro_f1_allagree", "accuracy_agree66"} <= set(evaluation["metrics"])
    result = jobs.register(settings, run_id, str(tiny_classifier))

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(settings.model_name, registry.CANDIDATE)
    assert version.version == result["version"]
    run = client.get_run(run_id)
    assert version.tags["data_digest"] == run.data.tags["data_digest"] != ""
    assert version.tags["test_digest"] == run.data.tags["test_digest"] != ""
    assert version.tags["git_commit"] == registry.git_commit(settings.project_dir)
    assert version.tags["config_hash"] == registry.train_config_hash(settings.train) == result["config_hash"]
    assert len(version.tags["config_hash"]) == 12
    assert "CC BY-NC-SA 3.0" in version.description and run.data.tags["test_digest"] in version.description
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"model_card.md", "plots/reliability_diagram.png", "plots/confusion_matrix.png"} <= artifacts

    mlflow.set_tracking_uri(mlflow_server)
    uri = f"models:/{settings.model_name}@{registry.CANDIDATE}"
    info = mlflow.models.get_model_info(uri)
    assert [spec.type.name for spec in info.signature.inputs.inputs] == ["string"]
    assert info.signature.outputs.input_names() == ["label", "negative", "neutral", "positive"]
    assert info.saved_input_example_info is not None
    assert info.metadata["max_length"] == settings.train.max_length
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    card = next(p for p in Path(local).rglob("model_card.md"))
    assert "Malo" in card.read_text()
    label_map = json.loads(next(Path(local).rglob("label_map.json")).read_text())
    assert label_map == {"labels": ["negative", "neutral", "positive"], "max_length": settings.train.max_length}

    model = mlflow.pyfunc.load_model(uri)
    for given in (["Operating profit rose .", "Sales fell sharply ."], pd.DataFrame({"text": ["Profit rose .", "x"]})):
        scored = model.predict(given)
        assert list(scored.columns) == ["label", "negative", "neutral", "positive"] and len(scored) == 2
        assert set(scored["label"]) <= {"negative", "neutral", "positive"}
        np.testing.assert_allclose(scored[["negative", "neutral", "positive"]].sum(axis=1), 1.0, rtol=1e-5)

    # The registered model can teach a student (TrainConfig.teacher_model): its transformers folder comes back.
    from pipeline.train.distill import teacher_folder

    teacher = Path(teacher_folder(uri, tmp_path))
    assert json.loads((teacher / "config.json").read_text()) == json.loads((tiny_classifier / "config.json").read_text())

    # A fine-tuning step runs in a process of its own (an Airflow worker's, or `finsent finetune`), where nothing
    # has connected to the tracking server before the registered teacher is downloaded.
    student = settings.model_copy(update={"train": settings.train.model_copy(update={"epochs": 1, "teacher_model": uri})})
    (tmp_path / "settings.json").write_text(student.model_dump_json())
    code = ("import sys; from pipeline.config import Settings; from pipeline.train import jobs; "
            "settings = Settings.model_validate_json(open(sys.argv[1]).read()); "
            "d = jobs.finetune(settings, sys.argv[2], sys.argv[3])['distillation']; print(d['teacher'], d['teacher_pinned'])")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    student_run = jobs.start_run(student)["run_id"]
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "settings.json"), student_run,
                           str(settings.train.base_model)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"{uri} models:/{settings.model_name}/{result['version']}"

    # Once the student is registered, its run's checkpoints, which serve only a retried step, go; its model stays.
    run_folder = student.runs_dir / student_run
    model_dir = run_folder / "finetune" / "trial-0" / "model"
    # The saved result, which a retried step reads back, names the version the alias pointed to, not the alias.
    saved = json.loads((model_dir.parent / "finetune_result.json").read_text())
    assert saved["fingerprint"]["teacher"] == f"models:/{settings.model_name}/{result['version']}"
    assert [p.name for p in run_folder.rglob("checkpoints")] == ["checkpoints"]
    registered = jobs.register(student, student_run, str(model_dir))
    assert registered["checkpoint_bytes_removed"] > 0 and not list(run_folder.rglob("checkpoints"))
    assert (model_dir / "config.json").is_file()
    assert client.get_model_version_by_alias(settings.model_name, registry.CANDIDATE).version == registered["version"]


def test_the_pyfunc_loads_a_mean_pooled_model_where_finsent_is_not_imported_without_asking(tmp_path, tiny_classifier):
    """MLflow's model server loads the registered pyfunc without the finsent package's
    heads registered: the head's code shipped in the folder is trusted, and nothing
    asks on the terminal whether to run it (in a terminal, that prompt waits)."""
    assert json.loads((tiny_classifier / "config.json").read_text())["model_type"].startswith("finsent_mean_pool")
    label_map = tmp_path / "label_map.json"
    label_map.write_text(json.dumps({"labels": ["negative", "neutral", "positive"], "max_length": 64}))
    code = ("import sys, types; from pipeline.sentiment_pyfunc import SentimentClassifier; "
            "assert 'pipeline.train.pooling' not in sys.modules; model = SentimentClassifier(); "
            "model.load_context(types.SimpleNamespace(artifacts={'hf_model': sys.argv[1], 'label_map': sys.argv[2]})); "
            "print(model.predict(None, ['Operating profit rose .'])['label'].tolist())")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_classifier), str(label_map)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "custom code" not in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] in ("['negative']", "['neutral']", "['positive']")

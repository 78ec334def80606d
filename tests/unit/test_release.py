"""The release against a real MLflow registry with tiny models: blessed
variants written once with their sha256, verified at every load; the gate,
the infra check, compare-and-set promotion, forced promotion, rollback and
lineage; and the clear failures that leave the champion untouched."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import registry
from pipeline.cli import main as finsent
from pipeline.config import get_settings
from pipeline.release import ReleaseError
from pipeline.release.jobs import export_candidate, force_promote, gate, infra_check, promote, rollback
from serving.errors import ModelLoadError
from serving.model import MANIFEST, OnnxClassifier
from serving.registry import blessed_variants, fetch_verified, load_version, variant_checksums
from tests.conftest import make_settings

MODEL = "finsent-release-test"


def _register(settings, model_dir: Path) -> str:
    run_id = registry.start_training_run(settings, "data-digest", "test-digest", "cache-key")
    return registry.register_classifier(settings, run_id, model_dir).version


def _always_negative(source: Path, dest: Path) -> Path:
    """The tiny classifier with its head biased to the rarest class: a clearly worse model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(source)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def released(tmp_path_factory, ingested, tiny_classifier, mlflow_service, fpb_subset, reuters_subset, tiny_base):
    """v1 a worse model, v2 and v3 the tiny classifier twice; all three exported and blessed."""
    uri, artifacts = mlflow_service
    project = tmp_path_factory.mktemp("released") / "project"
    shutil.copytree(ingested.project_dir, project)
    settings = make_settings(project, fpb_subset, reuters_subset, tiny_base, tracking_uri=uri, model_name=MODEL)
    # A constant model passes every invariance case, so the tiny classifier "regresses" there: the
    # behavioural rule has its own tests (test_gate_rules.py); here it is let through.
    settings = settings.model_copy(update={"release": settings.release.model_copy(update={"behaviour_max_drop": 1.0})})
    worse = _always_negative(tiny_classifier, tmp_path_factory.mktemp("worse"))
    versions = [_register(settings, worse), _register(settings, tiny_classifier), _register(settings, tiny_classifier)]
    exports = {v: export_candidate(settings, v) for v in versions}
    return settings, artifacts, versions, exports


def _version(settings, number):
    return MlflowClient(settings.tracking_uri).get_model_version(MODEL, number)


def _champion(settings) -> str:
    return MlflowClient(settings.tracking_uri).get_model_version_by_alias(MODEL, "champion").version


def test_blessed_variants_are_uploaded_once_with_a_sha256_for_every_file(released):
    settings, artifacts, versions, exports = released
    v = versions[1]
    version = _version(settings, v)
    blessed = blessed_variants(version)
    assert "fp32" in blessed and exports[v]["artifact"] == f"onnx/v{v}"
    assert set(exports[v]["blessing"]) == {"fp32", "fp32-optimized", "int8", "fp16"}
    for variant in ("fp32", "fp32-optimized", "int8", "fp16"):
        assert version.tags[f"blessing/{variant}"], variant  # figures for every variant, blessed or not
    assert version.tags["onnx_default_cpu"] in blessed
    client = MlflowClient(settings.tracking_uri)
    uploaded = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(version.run_id, f"onnx/v{v}")}
    assert uploaded == {*blessed, "blessing.json"}  # unblessed variants are never uploaded
    for variant in blessed:
        assert set(variant_checksums(version, variant)) == {"model.onnx", "tokenizer.json", MANIFEST}
    assert float(version.tags["parity_max_abs_diff"]) < 1e-4 and version.tags["parity_label_flips"] == "0"


def test_re_releasing_never_changes_the_served_bytes_and_a_tampered_file_is_refused(released, tmp_path):
    settings, artifacts, versions, _ = released
    v = versions[1]
    before = _version(settings, v)
    again = export_candidate(settings, v)
    assert again["reused"] and again["artifact"] == f"onnx/v{v}"
    after = _version(settings, v)
    assert {k: t for k, t in after.tags.items() if k.startswith("sha256/")} == \
        {k: t for k, t in before.tags.items() if k.startswith("sha256/")}
    variant = before.tags["onnx_default_cpu"]
    # The server is shared by the session's tests: other models have an onnx/v2 too, in their own runs.
    stored = next(artifacts.glob(f"*/{before.run_id}/artifacts/onnx/v{v}/{variant}/model.onnx"))
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-64] + bytes(64))  # same size, other bytes
        with pytest.raises(ModelLoadError, match=r"model\.onnx has sha256 .* refusing"):
            load_version(settings.tracking_uri, after, tmp_path / "fresh-cache")
        with pytest.raises(ModelLoadError, match=r"model\.onnx has sha256"):  # what the infra check serves
            fetch_verified(settings.tracking_uri, after, tmp_path / "fresh-cache-2")
    finally:
        stored.write_bytes(original)
    model = load_version(settings.tracking_uri, after, tmp_path / "cache")
    assert model.variant == variant and model.version == v
    # A cached copy changed on disk is fetched again from the registry, then verified.
    (model.model_dir / "tokenizer.json").write_text("{}")
    assert load_version(settings.tracking_uri, after, tmp_path / "cache").version == v


def test_an_uncommitted_upload_is_never_written_over(released):
    from pipeline.release.jobs import _free_artifact_path

    settings, _, versions, _ = released
    run_id = _version(settings, versions[0]).run_id
    assert _free_artifact_path(settings, run_id, "99") == "onnx/v99"
    assert _free_artifact_path(settings, run_id, versions[0]) == f"onnx/v{versions[0]}.2"


def test_gate_infra_check_compare_and_set_force_and_rollback(released, capsys):
    settings, _, (worse, good, same), _ = released
    first = gate(settings, worse)
    assert first["promote"] and first["champion_version"] is None
    infra = infra_check(settings, worse)
    assert infra["passed"] and infra["requests"] == settings.release.infra_requests + 1 and infra["errors"] == 0
    assert promote(settings, first, infra, by="test")["champion_version"] == worse
    # Two overlapping releases gated against the same champion: the first promotes, the second finds the
    # champion moved, is gated again against the new one and, being identical to it, is not promoted.
    run_a, run_b = gate(settings, good), gate(settings, same)
    assert run_a["promote"] and run_b["promote"], (run_a["reason"], run_b["reason"])
    assert promote(settings, run_a, by="run-a")["champion_version"] == good
    late = promote(settings, run_b, by="run-b")
    assert not late["promoted"] and late["champion_version"] == good and "identical" in late["reason"]
    tags = _version(settings, same).tags
    assert tags["gate_decision"] == "reject" and "identical" in tags["gate_reason"]
    assert tags["release_decision"] == "not promoted" and tags["release_decided_by"] == "run-b"
    assert "reject" in _version(settings, good).tags[f"challenge/v{same}"]
    champion_tags = _version(settings, good).tags
    assert champion_tags["previous_champion"] == worse and champion_tags["promoted_by"] == "run-a"
    assert _version(settings, worse).tags["replaced_by"] == good
    assert set(k for k in champion_tags if k.startswith("behaviour/")) >= {"behaviour/negation", "behaviour/noise"}
    # A person's override and a rollback, both through the CLI and recorded.
    env = {"FINSENT_TRACKING_URI": settings.tracking_uri, "FINSENT_MODEL_NAME": MODEL,
           "FINSENT_STATE_DIR": str(settings.state_dir)}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()  # the CLI reads the environment once per process
        with pytest.raises(SystemExit, match="needs --force"):
            finsent(["promote", same, "--reason", "hotfix"])
        assert _champion(settings) == good
        assert finsent(["promote", same, "--force", "--reason", "hotfix for a customer"]) == 0
        assert _champion(settings) == same
        forced = _version(settings, same).tags
        assert forced["promotion"] == "forced" and forced["forced_reason"] == "hotfix for a customer"
        assert forced["previous_champion"] == good
        assert finsent(["rollback", "--reason", "hotfix regressed"]) == 0
        assert _champion(settings) == good
        assert _version(settings, same).tags["rollback_reason"] == "hotfix regressed"
        capsys.readouterr()
        assert finsent(["lineage"]) == 0
        text = capsys.readouterr().out
        assert f"version {good} of {MODEL}" in text and "sha256" in text and "training run" in text
        assert "data: DVC data.dvc digest data-digest" in text and "base model:" in text
        assert finsent(["lineage", f"models:/{MODEL}/{worse}", "--format", "json"]) == 0
        chain = json.loads(capsys.readouterr().out)
        assert chain["version"] == worse and chain["onnx"]["variants"]["fp32"]["files"]["model.onnx"]
    get_settings.cache_clear()


def test_failures_are_clear_and_leave_the_champion(released, tmp_path, tiny_onnx, monkeypatch):
    settings, _, (worse, good, same), _ = released
    champion = _champion(settings)
    with pytest.raises(ReleaseError, match="needs --reason"):
        force_promote(settings, worse, "  ")
    # A candidate that loses on the agreement slices and on the behavioural suite: the reasons are in its tags.
    strict = settings.model_copy(update={"release": settings.release.model_copy(update={"behaviour_max_drop": 0.0})})
    assert not gate(strict, worse)["promote"]
    reason = _version(settings, worse).tags["gate_reason"]
    assert reason.startswith(f"rejected against champion v{champion}") and "slice:agree50" in reason
    assert "behaviour:" in reason and _version(settings, worse).tags["gate_decision"] == "reject"
    down = settings.model_copy(update={"tracking_uri": "http://127.0.0.1:9"})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception, match="127.0.0.1:9"):
        rollback(down, "registry down")
    with pytest.raises(LookupError, match="no blessed ONNX variants"):
        client = MlflowClient(settings.tracking_uri)
        client.delete_model_version_tag(MODEL, worse, "onnx_variants")
        try:
            load_version(settings.tracking_uri, _version(settings, worse), tmp_path)
        finally:
            client.set_model_version_tag(MODEL, worse, "onnx_variants", "fp32")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_onnx, truncated)
    onnx_file = truncated / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.onnx has sha256"):
        OnnxClassifier(truncated)
    manifest = json.loads((truncated / MANIFEST).read_text())
    manifest.pop("sha256")
    (truncated / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        OnnxClassifier(truncated)
    assert _champion(settings) == champion


def test_releasing_the_champion_again_is_a_no_op_that_keeps_its_history(released):
    # What a cached training run leaves behind when the release runs anyway: @candidate is @champion.
    settings = released[0]
    champion = _version(settings, _champion(settings))
    decision = gate(settings, champion.version)
    assert decision["no_op"] and not decision["promote"] and "already the champion" in decision["reason"]
    result = promote(settings, decision, None, by="test")
    assert result["no_op"] and not result["promoted"] and result["champion_version"] == champion.version
    assert _champion(settings) == champion.version and _version(settings, champion.version).tags == champion.tags


def test_a_gpu_provider_that_falls_back_to_cpu_is_refused_unless_allowed(tiny_onnx):
    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match="asked for CUDAExecutionProvider"):
        OnnxClassifier(tiny_onnx, providers=asked)
    model = OnnxClassifier(tiny_onnx, providers=asked, allow_provider_fallback=True)
    assert model.provider_fallback and model.providers == ["CPUExecutionProvider"]


def test_the_server_follows_its_alias_and_a_failed_reload_keeps_the_old_model(released):
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from serving.app import create_app

    settings, artifacts, (worse, good, same), _ = released
    client = MlflowClient(settings.tracking_uri)
    client.set_registered_model_alias(MODEL, "live", good)  # an alias of its own: the other tests' stay as they are
    serving = settings.serving.model_copy(update={"alias": "live", "admin_token": SecretStr("s3cret"),
                                                  "reload_interval_s": 0.2})
    admin = {"Authorization": "Bearer s3cret"}
    try:
        with TestClient(create_app(settings.model_copy(update={"serving": serving}))) as http:
            model = http.get("/v1/model").json()
            assert model["version"] == good and model["alias"] == "live"
            assert model["sha256"] == variant_checksums(_version(settings, good), model["variant"])
            assert http.post("/v1/admin/reload").status_code == 401
            assert http.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
            # The background poll follows the alias.
            client.set_registered_model_alias(MODEL, "live", same)
            deadline = time.monotonic() + 60
            while http.get("/v1/model").json()["version"] != same:
                assert time.monotonic() < deadline, "the alias moved, the server did not"
                time.sleep(0.1)
            answer = http.post("/v1/predict", json={"text": "Profit rose ."}).json()
            assert answer["model_version"] == same and answer["model_alias"] == "live"
            # A version whose file changed after blessing is refused; the old model keeps serving.
            run_id = _version(settings, worse).run_id
            variant = _version(settings, worse).tags["onnx_default_cpu"]
            stored = next(artifacts.glob(f"*/{run_id}/artifacts/onnx/v{worse}/{variant}/model.onnx"))
            original = stored.read_bytes()
            stored.write_bytes(original[:-64] + bytes(64))
            try:
                client.set_registered_model_alias(MODEL, "live", worse)
                result = http.post("/v1/admin/reload", headers=admin).json()
                assert result["status"] == "failed" and result["reason"] == "model_refused", result
                assert http.post("/v1/predict", json={"text": "Profit rose ."}).json()["model_version"] == same
                ready = http.get("/readyz").json()
                assert ready["model_version"] == same and ready["last_reload"]["reason"] == "model_refused"
                assert "finsent_model_load_failures_total" in http.get("/metrics").text
            finally:
                stored.write_bytes(original)
            assert http.post("/v1/admin/reload", headers=admin).json()["status"] in ("reloaded", "unchanged")
            assert http.get("/v1/model").json()["version"] == worse
        # A canary share of 1: every answer comes from @candidate, and says so.
        canary = serving.model_copy(update={"canary_share": 1.0, "reload_interval_s": 0})
        candidate = client.get_model_version_by_alias(MODEL, "candidate").version
        with TestClient(create_app(settings.model_copy(update={"serving": canary}))) as http:
            answer = http.post("/v1/predict", json={"text": "Profit rose ."}).json()
            assert answer["model_alias"] == "candidate" and answer["model_version"] == candidate
            assert http.get("/v1/model").json()["canary"]["version"] == candidate
            assert f'finsent_predicted_texts_total{{model_version="{candidate}",role="candidate"}} 1.0' in \
                http.get("/metrics").text
    finally:
        client.delete_registered_model_alias(MODEL, "live")

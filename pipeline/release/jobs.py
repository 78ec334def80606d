"""The release stage's steps: export and bless the variants, upload them once,
gate, check the candidate's server, promote by compare-and-set; and the
human overrides (forced promotion, rollback)."""

from __future__ import annotations

import getpass
import json
import logging
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion

from pipeline import registry
from pipeline.config import LABELS, Settings
from pipeline.data.frozen import require_frozen_test_set
from pipeline.data.ingest import load_split
from pipeline.release import ReleaseError
from pipeline.release.behavioural import load_suite, run_suite
from pipeline.release.gate import Evaluation, decide_promotion
from serving.registry import (
    ARTIFACT_TAG, DEFAULT_CPU_TAG, VARIANTS_TAG, blessed_variants, fetch_verified, load_version, sha_tag,
)

log = logging.getLogger(__name__)


class ParityError(ReleaseError):
    """The plain fp32 export disagrees with PyTorch beyond its budget: nothing is uploaded."""


class PromotionError(ReleaseError):
    """A promotion or rollback that cannot be done; the champion is left as it was."""


def actor() -> str:
    """Who or what acts, for the decision tags: ``cli:<user>@<host>`` unless a DAG task says otherwise."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _work_dir(settings: Settings, version: str) -> Path:
    path = settings.state_dir / "release" / f"v{version}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _candidate(settings: Settings, version: str | None) -> ModelVersion:
    client = registry.connect(settings)
    if version:
        return client.get_model_version(settings.model_name, version)
    found = registry.version_by_alias(settings, registry.CANDIDATE)
    if found is None:
        raise LookupError(f"registered model {settings.model_name!r} has no alias {registry.CANDIDATE!r}")
    return found


def _test_split(settings: Settings):
    test = load_split(settings.labeled_dir, "test")
    require_frozen_test_set(settings.project_dir, test)
    return test


def _tag(settings: Settings, version: ModelVersion, tags: dict) -> None:
    client = registry.connect(settings)
    for key, value in tags.items():
        client.set_model_version_tag(settings.model_name, version.version, key, str(value))


def _free_artifact_path(settings: Settings, run_id: str, version: str) -> str:
    """``onnx/v<version>``, or the first ``.<n>`` suffix no earlier, uncommitted upload wrote to: files are written once."""
    client = registry.connect(settings)
    base = f"{registry.ONNX_ARTIFACT_PATH}/v{version}"
    for attempt in range(1, 100):
        path = base if attempt == 1 else f"{base}.{attempt}"
        if not client.list_artifacts(run_id, path):
            return path
    raise RuntimeError(f"run {run_id} holds 99 uncommitted uploads of version {version}")


def export_candidate(settings: Settings, version: str | None = None) -> dict:
    """Exports a registered version's variants, blesses each on the frozen test
    split against PyTorch, uploads the blessed ones to a new path and records
    their sha256 on the version. A version already released is left as it is."""
    from pipeline.export.onnx import export_onnx
    from pipeline.export.variants import FP32, blessing_record, build_and_bless, default_cpu_variant
    from pipeline.train.evaluate import label_ids
    from pipeline.train.model import load_classifier, predict_logits
    from serving.model import file_sha256

    candidate = _candidate(settings, version)
    if blessed_variants(candidate):
        log.info("version %s was released before (%s): its files are never written again", candidate.version,
                 candidate.tags[ARTIFACT_TAG])
        return {"version": candidate.version, "reused": True, "artifact": candidate.tags[ARTIFACT_TAG],
                "variants": blessed_variants(candidate), "default_cpu": candidate.tags.get(DEFAULT_CPU_TAG)}
    work = _work_dir(settings, candidate.version)
    hf_dir = registry.download_hf_model(candidate, work / "registered")
    test = _test_split(settings)
    texts, max_length = test["text"].tolist(), settings.train.max_length
    fp32_dir = export_onnx(hf_dir, work / "variants" / FP32, max_length, candidate.name, candidate.version)
    model, tokenizer = load_classifier(str(hf_dir))
    reference = predict_logits(model, tokenizer, texts, max_length)
    del model
    # The validation split's sentences tune the smoothed int8 (no labels); the test split only judges.
    tuning = load_split(settings.labeled_dir, "validation")["text"].tolist()
    folders, blessings = build_and_bless(hf_dir, fp32_dir, work / "variants", reference, texts,
                                         label_ids(test["label"]), settings.release.budgets, tuning)
    for blessing in blessings.values():
        log.info("%s: %s", blessing.variant, blessing.summary())
    fp32 = blessings[FP32]
    figures = {f"blessing/{name}": b.summary() for name, b in blessings.items()}
    figures.update(parity_max_abs_diff=fp32.max_abs_diff, parity_label_flips=fp32.label_flips)
    _tag(settings, candidate, figures)
    if not fp32.blessed:
        raise ParityError(f"ONNX export of version {candidate.version} is not blessed: {'; '.join(fp32.reasons)}. "
                          "Nothing was uploaded.")
    default_cpu = default_cpu_variant(blessings)
    record = blessing_record(blessings, default_cpu)
    blessed = [name for name, b in blessings.items() if b.blessed]
    artifact = _free_artifact_path(settings, candidate.run_id, candidate.version)
    checksums = {sha_tag(name, path.name): file_sha256(path)
                 for name in blessed for path in sorted(folders[name].iterdir()) if path.is_file()}
    with mlflow.start_run(run_id=candidate.run_id):
        for name in blessed:
            mlflow.log_artifacts(str(folders[name]), f"{artifact}/{name}")
        mlflow.log_dict(record, f"{artifact}/blessing.json")
        mlflow.log_metrics({f"blessing_{name.replace('-', '_')}_{key}": getattr(b, key) for name, b in blessings.items()
                            for key in ("flip_rate", "macro_f1_delta_pt", "max_abs_diff", "cpu_seq_per_s")})
    # The variants tag is written last: until it exists, nothing loads this version's files.
    _tag(settings, candidate, {**checksums, ARTIFACT_TAG: artifact, DEFAULT_CPU_TAG: default_cpu})
    _tag(settings, candidate, {VARIANTS_TAG: ",".join(blessed)})
    shutil.rmtree(work / "registered", ignore_errors=True)
    return {"version": candidate.version, "reused": False, "artifact": artifact, "variants": blessed,
            "default_cpu": default_cpu, "blessing": {name: b.summary() for name, b in blessings.items()},
            "parity": {"max_abs_diff": fp32.max_abs_diff, "label_flips": fp32.label_flips, "n": fp32.n}}


def evaluate_version(settings: Settings, version: ModelVersion, test, suite) -> Evaluation:
    """Scores a version's served (default CPU, checksum-verified) variant on the test split and the suite."""
    from pipeline.train.evaluate import agreement_slices, classification_metrics, label_ids

    model = load_version(settings.tracking_uri, version, settings.state_dir / "release" / "models")
    probs = model.probabilities(test["text"].tolist())
    y = label_ids(test["label"])
    predicted = probs.argmax(axis=1)
    return Evaluation(
        version=version.version, labels=list(model.labels), predicted=predicted,
        slices=agreement_slices(y, predicted, test["agreement"].to_numpy()),
        behaviour=run_suite(suite, model.probabilities, model.labels),
        macro_f1=classification_metrics(y, probs)["macro_f1"],
    )


def _suite(settings: Settings):
    return load_suite(settings.release.behavioural_dir, LABELS)


def _already_champion(version: str) -> dict:
    """The decision on a candidate that is the champion already: nothing to gate, nothing recorded on the
    version (its own gate decision stays), and promote leaves the alias and its history alone."""
    reason = f"version {version} is already the champion: nothing to release"
    log.info("gate: %s", reason)
    return {"candidate_version": version, "champion_version": version, "decided_at": _now(), "no_op": True,
            "promote": False, "reason": reason, "behaviour": None}


def gate(settings: Settings, version: str | None = None) -> dict:
    """Scores candidate and champion on the frozen test split and the behavioural
    suite with their served variants, decides, and records the decision on both."""
    from pipeline.train.evaluate import label_ids

    candidate = _candidate(settings, version)
    champion = registry.version_by_alias(settings, registry.CHAMPION)
    if champion is not None and champion.version == candidate.version:
        return _already_champion(candidate.version)
    test, suite = _test_split(settings), _suite(settings)
    mine = evaluate_version(settings, candidate, test, suite)
    theirs = None
    if champion is not None and champion.version != candidate.version:
        theirs = evaluate_version(settings, champion, test, suite)
    decision = decide_promotion(label_ids(test["label"]), mine, theirs, settings.release)
    record = {
        "candidate_version": candidate.version,
        "champion_version": champion.version if champion else None,
        "decided_at": _now(),
        "behaviour": {"candidate": mine.behaviour, "champion": theirs.behaviour if theirs else None},
        **decision.to_dict(),
    }
    log.info("gate: version %s vs champion %s: %s", candidate.version, record["champion_version"], decision.reason)
    rates = {f"gate_behaviour_{name}": entry["pass_rate"] for name, entry in mine.behaviour["capabilities"].items()}
    with mlflow.start_run(run_id=candidate.run_id):
        mlflow.log_dict(record, f"release/gate_v{candidate.version}_vs_v{record['champion_version']}.json")
        mlflow.log_metrics({**rates, "gate_behaviour_pass_rate": mine.behaviour["pass_rate"]})
    verdict = "promote" if decision.promote else "reject"
    _tag(settings, candidate, {
        "gate_decision": verdict, "gate_reason": decision.reason[:4900],
        "gate_champion_version": record["champion_version"] or "none",
        **{f"behaviour/{name}": f"{e['passed']}/{e['n']}" for name, e in mine.behaviour["capabilities"].items()},
    })
    if theirs is not None:
        _tag(settings, champion, {f"challenge/v{candidate.version}": f"{verdict}: {decision.reason}"[:4900]})
    return record


def infra_check(settings: Settings, version: str | None = None) -> dict:
    """Serves the candidate's blessed default variant on a free loopback port,
    sends the input example and ``infra_requests`` one-text requests, and
    requires no error and p95 under ``infra_p95_ms``."""
    import os
    import time
    import urllib.request

    from pipeline.services import free_port, start_serving, stop_process

    candidate = _candidate(settings, version)
    folder = fetch_verified(settings.tracking_uri, candidate, settings.state_dir / "release" / "models")
    texts = _test_split(settings)["text"].tolist()
    port = free_port()
    env = {**os.environ, "FINSENT_SERVING__MODEL_DIR": str(folder.resolve()), "FINSENT_TRACKING_URI": settings.tracking_uri}
    log_path = settings.state_dir / "logs" / f"infra-check-v{candidate.version}.log"
    url = f"http://127.0.0.1:{port}/v1/predict"
    latencies, errors = [], []
    process = start_serving(env, port, log_path)
    try:
        requests = [["Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.", "Net sales fell by 5 %."]]
        requests += [[texts[i % len(texts)]] for i in range(settings.release.infra_requests)]
        for body in requests:
            request = urllib.request.Request(url, data=json.dumps({"texts": body}).encode(),
                                             headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                if len(answer["predictions"]) != len(body):
                    errors.append(f"{len(answer['predictions'])} predictions for {len(body)} texts")
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
            latencies.append(1000 * (time.perf_counter() - start))
    finally:
        stop_process(process)
    p95 = float(np.percentile(latencies[1:], 95))
    passed = not errors and p95 <= settings.release.infra_p95_ms
    result = {"version": candidate.version, "passed": passed, "requests": len(latencies), "errors": len(errors),
              "p50_ms": round(float(np.percentile(latencies[1:], 50)), 2), "p95_ms": round(p95, 2),
              "slo_p95_ms": settings.release.infra_p95_ms, "first_error": errors[0] if errors else None}
    _tag(settings, candidate, {"infra_check": "pass" if passed else "fail", "infra_p95_ms": result["p95_ms"],
                               "infra_errors": len(errors), "infra_requests": len(latencies)})
    log.info("infra check of version %s: %s", candidate.version, result)
    return result


def _lock(settings: Settings) -> FileLock:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(settings.state_dir / "promotion.lock"), timeout=600)


def _move_champion(settings: Settings, version: ModelVersion, previous: ModelVersion | None, how: dict) -> None:
    client = registry.connect(settings)
    client.set_registered_model_alias(settings.model_name, registry.CHAMPION, version.version)
    _tag(settings, version, {"champion_since": _now(), "previous_champion": previous.version if previous else "none",
                             **how})
    if previous is not None and previous.version != version.version:
        _tag(settings, previous, {"replaced_by": version.version, "replaced_at": _now()})


def promote(settings: Settings, gate_record: dict, infra: dict | None = None, by: str | None = None) -> dict:
    """Moves ``@champion`` to the gated candidate by compare-and-set: only if the
    champion is still the version the gate compared against; otherwise the
    candidate is gated again against the new champion first."""
    by = by or actor()
    version = gate_record["candidate_version"]
    with _lock(settings):
        current = registry.version_by_alias(settings, registry.CHAMPION)
        current_version = current.version if current else None
        if current_version != gate_record["champion_version"]:
            log.warning("champion moved from %s to %s since the gate: gating version %s again",
                        gate_record["champion_version"], current_version, version)
            gate_record = gate(settings, version)
        if gate_record.get("no_op"):
            return {"promoted": False, "no_op": True, "reason": gate_record["reason"], "champion_version": version,
                    "compared_with": version, "model_uri": f"models:/{settings.model_name}@{registry.CHAMPION}"}
        candidate = registry.connect(settings).get_model_version(settings.model_name, version)
        infra_ok = infra is None or infra["passed"]
        promoted = bool(gate_record["promote"]) and infra_ok
        reason = gate_record["reason"] if infra_ok else f"infra check failed: {infra}"
        if promoted:
            _move_champion(settings, candidate, current, {"promoted_by": by, "promotion": "gated"})
        _tag(settings, candidate, {"release_decision": "promoted" if promoted else "not promoted",
                                   "release_decided_by": by, "release_decided_at": _now()})
    log.info("release of version %s by %s: %s (%s)", version, by, "promoted" if promoted else "not promoted", reason)
    champion = registry.version_by_alias(settings, registry.CHAMPION)
    return {
        "promoted": promoted, "reason": reason, "champion_version": champion.version if champion else None,
        "compared_with": gate_record["champion_version"], "model_uri": f"models:/{settings.model_name}@{registry.CHAMPION}",
    }


def force_promote(settings: Settings, version: str, reason: str, by: str | None = None) -> dict:
    """A human's promotion past the gate, recorded as forced. The version must have blessed files to serve."""
    by = by or actor()
    if not reason.strip():
        raise PromotionError("a forced promotion needs --reason: it is recorded on the version")
    with _lock(settings):
        candidate = registry.connect(settings).get_model_version(settings.model_name, version)
        if not blessed_variants(candidate):
            raise PromotionError(f"version {version} has no blessed ONNX variants: release it first "
                                 f"(`finsent export-onnx --version {version}`)")
        current = registry.version_by_alias(settings, registry.CHAMPION)
        _move_champion(settings, candidate, current, {"promoted_by": by, "promotion": "forced", "forced_reason": reason})
    log.warning("forced promotion of version %s by %s: %s", version, by, reason)
    return {"promoted": True, "forced": True, "champion_version": version,
            "previous_champion": current.version if current else None, "reason": reason}


def rollback(settings: Settings, reason: str, by: str | None = None) -> dict:
    """Moves ``@champion`` back to the version it replaced, recorded on both."""
    by = by or actor()
    with _lock(settings):
        current = registry.version_by_alias(settings, registry.CHAMPION)
        if current is None:
            raise PromotionError(f"{settings.model_name} has no champion to roll back")
        previous = current.tags.get("previous_champion", "none")
        if previous in ("", "none"):
            raise PromotionError(f"champion version {current.version} records no previous champion to roll back to")
        target = registry.connect(settings).get_model_version(settings.model_name, previous)
        client = registry.connect(settings)
        client.set_registered_model_alias(settings.model_name, registry.CHAMPION, target.version)
        _tag(settings, current, {"rolled_back_at": _now(), "rolled_back_by": by, "rollback_reason": reason or "none"})
        _tag(settings, target, {"champion_since": _now(), "restored_by_rollback_from": current.version})
    log.warning("rollback by %s: champion %s -> %s (%s)", by, current.version, target.version, reason)
    return {"champion_version": target.version, "rolled_back_from": current.version, "reason": reason}

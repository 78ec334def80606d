"""``finsent lineage``: one chain from an alias to the data and the base model,
read from what the registry and the training run recorded."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from pipeline import registry
from pipeline.config import Settings
from pipeline.release import ReleaseError
from serving.registry import ARTIFACT_TAG, DEFAULT_CPU_TAG, blessed_variants, variant_checksums


def _resolve(settings: Settings, model_uri: str | None):
    client = registry.connect(settings)
    uri = model_uri or f"models:/{settings.model_name}@{registry.CHAMPION}"
    if not uri.startswith("models:/"):
        raise ReleaseError(f"{uri!r}: give models:/<name>@<alias> or models:/<name>/<version>")
    path = uri.removeprefix("models:/")
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            return uri, alias, client.get_model_version_by_alias(name, alias)
        name, _, number = path.partition("/")
        return uri, None, client.get_model_version(name, number)
    except MlflowException as err:
        raise ReleaseError(f"{uri}: not in the registry at {settings.tracking_uri} ({err.message})") from None


def lineage(settings: Settings, model_uri: str | None = None) -> dict:
    uri, alias, version = _resolve(settings, model_uri)
    client = registry.connect(settings)
    tags = version.tags
    run = client.get_run(version.run_id)
    params, run_tags = run.data.params, run.data.tags
    docs = [a.path for a in client.list_artifacts(version.run_id, "data_docs")]
    onnx = {
        variant: {"default_cpu": variant == tags.get(DEFAULT_CPU_TAG), "blessing": tags.get(f"blessing/{variant}", ""),
                  "files": variant_checksums(version, variant)}
        for variant in blessed_variants(version)
    }
    return {
        "uri": uri, "alias": alias, "name": version.name, "version": version.version,
        "registered_at": version.creation_timestamp,
        "release": {key: tags.get(key) for key in ("gate_decision", "gate_reason", "infra_check", "infra_p95_ms",
                                                   "promotion", "promoted_by", "forced_reason", "champion_since",
                                                   "previous_champion") if tags.get(key)},
        "onnx": {"artifact": f"runs:/{version.run_id}/{tags[ARTIFACT_TAG]}" if tags.get(ARTIFACT_TAG) else None,
                 "variants": onnx},
        "run": {"run_id": version.run_id, "experiment_id": run.info.experiment_id, "git_commit": tags.get("git_commit"),
                "config_hash": tags.get("config_hash")},
        "recipe": run_tags.get("recipe"),
        "data": {"dvc_digest": tags.get("data_digest"), "test_digest": tags.get("test_digest"),
                 "dvc_file": "data.dvc", "git_commit": tags.get("git_commit")},
        "validation": {"gx_data_docs": [f"runs:/{version.run_id}/{path}" for path in docs]},
        "base": {"base_model": params.get("train.base_model"), "teacher_model": params.get("train.teacher_model"),
                 "masked_lm": params.get("mlm_used")},
    }


def render_lineage(chain: dict) -> str:
    head = chain["uri"] + (f"  (alias {chain['alias']})" if chain["alias"] else "")
    release = chain["release"]
    lines = [head, f"└─ version {chain['version']} of {chain['name']}"]
    if release:
        lines.append("   ├─ release: " + ", ".join(f"{k}={v}" for k, v in release.items() if k != "gate_reason"))
        if release.get("gate_reason"):
            lines.append(f"   │    gate: {release['gate_reason']}")
    onnx = chain["onnx"]
    lines.append(f"   ├─ ONNX: {onnx['artifact'] or 'not released'}")
    for variant, entry in onnx["variants"].items():
        lines.append(f"   │  ├─ {variant}{'  (served on CPU)' if entry['default_cpu'] else ''}: {entry['blessing']}")
        for file, digest in sorted(entry["files"].items()):
            lines.append(f"   │  │    {file}  sha256 {digest}")
    run = chain["run"]
    lines += [
        f"   ├─ training run: {run['run_id']} (experiment {run['experiment_id']}, git {run['git_commit']}, "
        f"config {run['config_hash']})",
        f"   ├─ recipe: {chain['recipe'] or 'none (settings only)'}",
        f"   ├─ data: DVC {chain['data']['dvc_file']} digest {chain['data']['dvc_digest']} at git "
        f"{chain['data']['git_commit']}; frozen test split {chain['data']['test_digest']}",
        f"   ├─ validation (Great Expectations Data Docs): {', '.join(chain['validation']['gx_data_docs']) or 'none logged'}",
        f"   └─ base model: {chain['base']['base_model']}; masked-LM: {chain['base']['masked_lm'] or 'not run'}; "
        f"teacher: {chain['base']['teacher_model'] if chain['base']['teacher_model'] not in (None, 'None') else 'none'}",
    ]
    return "\n".join(lines)

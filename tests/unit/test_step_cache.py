"""The step cache: the key moves with the training data, the code, the config,
the base model's bytes and the teacher's registry version, and with nothing else;
a run is reused only once it registered a version that still exists, and
``--no-cache`` trains anyway."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline import registry
from pipeline.cli import build_parser, cmd_start_run, cmd_train
from pipeline.data.frozen import read_frozen
from pipeline.logs import summarize
from pipeline.train import cache, jobs


def _key(settings) -> str:
    return cache.cache_key(settings, read_frozen(settings.project_dir)["test_digest"])


def _with_train(settings, **fields):
    return settings.model_copy(update={"train": settings.train.model_copy(update=fields)})


@pytest.fixture
def own_copies(ingested, tiny_base, tmp_path, monkeypatch):
    """Settings whose project, base model and ``pipeline`` sources are copies this test may change."""
    project = Path(shutil.copytree(ingested.project_dir, tmp_path / "project"))
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    package = Path(shutil.copytree(cache.PACKAGE_DIR, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__")))
    monkeypatch.setattr(cache, "PACKAGE_DIR", package)
    settings = _with_train(ingested, base_model=str(base)).model_copy(update={"project_dir": project})
    return settings, base, package


def test_the_key_moves_with_each_input_and_with_nothing_else(own_copies):
    settings, base, package = own_copies
    key = _key(settings)
    # The copy of the sources holds the same files: where the package is installed does not count.
    assert cache.code_digest(package) == cache.code_digest(Path(registry.__file__).parent)
    weights = base / "model.safetensors"
    weights.touch()  # a newer mtime, the same bytes
    assert _key(settings) == key

    # A day's news or monitor output lands in data/ too (DVC's digest moves), but no training reads it.
    (settings.monitor_dir / "date=1987-03-02").mkdir(parents=True)
    (settings.monitor_dir / "date=1987-03-02" / "index.parquet").write_bytes(b"rows")
    assert _key(settings) == key
    train_split = settings.labeled_dir / "train.parquet"
    rows = train_split.read_bytes()
    pd.read_parquet(train_split).iloc[1:].to_parquet(train_split)
    assert _key(settings) != key
    train_split.write_bytes(rows)
    assert _key(settings) == key
    assert cache.cache_key(settings, "another") != key
    source = package / "train" / "classify.py"
    original = source.read_bytes()
    source.write_bytes(original + b"\n# a changed line\n")
    assert _key(settings) != key
    source.write_bytes(original)
    assert _key(settings) == key
    (package / "train" / "new_module.py").write_text("VALUE = 1\n")
    assert _key(settings) != key
    (package / "train" / "new_module.py").unlink()
    assert _key(_with_train(settings, epochs=settings.train.epochs + 1)) != key
    assert _key(_with_train(settings, sweep_seeds=[0, 1])) != key
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _key(settings) != key
    # A hub id without a local copy is keyed by its name.
    assert cache.model_digest("some-org/not-downloaded", settings.bases_dir) == "hub:some-org/not-downloaded"


def test_a_run_is_reused_once_it_registered_a_version_and_no_cache_trains_anyway(ingested, tiny_classifier, mlflow_server):
    settings = ingested.model_copy(update={"tracking_uri": mlflow_server, "experiment": "cache-test",
                                           "model_name": "finsent-cache-test"})
    client = MlflowClient(mlflow_server)

    # A run that never registered a model (failed, or still training) is no hit.
    first = jobs.start_run(settings)
    assert not first["cached"] and client.get_run(first["run_id"]).data.tags[cache.CACHE_TAG] == first["cache_key"]
    assert cache.find_cached_run(settings, first["cache_key"]) is None
    second = jobs.start_run(settings)
    assert not second["cached"] and second["run_id"] != first["run_id"] and second["cache_key"] == first["cache_key"]
    version = jobs.register(settings, second["run_id"], str(tiny_classifier))["version"]

    experiment_id = client.get_experiment_by_name("cache-test").experiment_id
    runs = {run.info.run_id for run in client.search_runs([experiment_id])}
    hit = jobs.start_run(settings)
    assert hit["cached"] and hit["run_id"] == second["run_id"] and hit["model_version"] == version
    assert {run.info.run_id for run in client.search_runs([experiment_id])} == runs
    tags = client.get_run(second["run_id"]).data.tags
    assert tags[cache.HITS_TAG] == "1" and tags[cache.REUSED_AT_TAG]
    assert summarize("train.start_run", hit).startswith(f"reused run {second['run_id']} (cache)")
    # `finsent train` returns the cached version's summary and trains nothing.
    summary = cmd_train(settings, build_parser().parse_args(["train"]))
    assert summary["cached"] and summary["version"] == version and summary["run_id"] == second["run_id"]
    assert summary["model_uri"] == f"models:/{settings.model_name}/{version}"
    assert client.get_run(second["run_id"]).data.tags[cache.HITS_TAG] == "2"
    assert client.get_model_version_by_alias(settings.model_name, registry.CANDIDATE).version == version

    forced = cmd_start_run(settings, build_parser().parse_args(["start-run", "--no-cache"]))
    assert not forced["cached"] and forced["run_id"] not in runs
    assert client.get_run(forced["run_id"]).data.tags[cache.CACHE_TAG] == hit["cache_key"]
    assert not jobs.start_run(settings, use_cache=False)["cached"]
    # The newest runs with the key registered nothing: the one that did is still found.
    assert cache.find_cached_run(settings, hit["cache_key"]).run_id == second["run_id"]
    assert cache.find_cached_run(settings.model_copy(update={"model_name": "another-model"}), hit["cache_key"]) is None

    # A teacher given by alias is keyed by the version the alias points at.
    newer = jobs.register(settings, forced["run_id"], str(tiny_classifier))["version"]
    student = _with_train(settings, teacher_model=f"models:/{settings.model_name}@{registry.CANDIDATE}")
    taught_by_newer = _key(student)
    assert _key(student) == taught_by_newer
    client.set_registered_model_alias(settings.model_name, registry.CANDIDATE, version)
    assert _key(student) != taught_by_newer

    # A deleted version is no hit: the next run with a live version is, then none.
    client.delete_model_version(settings.model_name, version)
    assert cache.find_cached_run(settings, hit["cache_key"]).run_id == forced["run_id"]
    client.delete_model_version(settings.model_name, newer)
    assert cache.find_cached_run(settings, hit["cache_key"]) is None

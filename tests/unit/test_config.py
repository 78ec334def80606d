"""The settings object validates itself, reads a recipe file, and is built once per process."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import (IngestConfig, Settings, TrainConfig, get_settings, settings_error_message,
                             unknown_environment_keys)
from pipeline.recipes import RECIPES_DIR, load_recipe, recipe_names


def _clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("FINSENT_")]:
        monkeypatch.delenv(key)


def test_every_named_recipe_is_a_valid_train_config():
    assert {"demo", "fpb-minilm", "fpb-distilled", "gpu-bert-base"} <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.path == RECIPES_DIR / f"{name}.yaml" and recipe.train
        assert recipe.path.read_text().startswith(f"# {name}:"), f"{name}: a recipe says what it is for first"
        TrainConfig.model_validate(recipe.train)


def test_a_recipe_replaces_defaults_and_the_environment_overrides_it(monkeypatch, tmp_path):
    _clean_env(monkeypatch)
    assert Settings(recipe="fpb-minilm").train.mlm_steps == 0 != TrainConfig().mlm_steps
    monkeypatch.setenv("FINSENT_TRAIN__MLM_STEPS", "7")
    monkeypatch.setenv("FINSENT_RECIPE", "fpb-minilm")
    settings = Settings()
    assert settings.recipe == "fpb-minilm" and settings.train.mlm_steps == 7 and settings.train.pooling == "mean"
    path = tmp_path / "mine.yaml"
    path.write_text("# mine: three epochs\nepochs: 3\n")
    assert Settings(recipe=str(path)).train.epochs == 3


def test_bad_recipes_and_options_get_messages_that_name_the_setting(monkeypatch, tmp_path):
    _clean_env(monkeypatch)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nsoup_size: 4\n")
    cases = {
        "recipe": (dict(recipe=str(bad)), f"recipe {bad}: soup_size: Extra inputs are not permitted"),
        "name": (dict(recipe="no-such"), "no recipe named 'no-such'; the named ones are demo"),
        "lora": (dict(train={"lora_r": 4}), "train: lora_r applies only with finetune_method=lora"),
        "teacher": (dict(train={"distill_corpus_texts": 10}), "need a teacher_model to distill from"),
        "fractions": (dict(ingest={"test_fraction": 0.3}), "must be positive and sum to 1, got 0.72 + 0.08 + 0.3"),
        "unknown": (dict(train={"ema_decay": 0.9}), "train.ema_decay: Extra inputs are not permitted"),
        "top-level": (dict(no_such_setting=1), "no_such_setting: Extra inputs are not permitted"),
    }
    for name, (kwargs, expected) in cases.items():
        with pytest.raises(ValidationError) as caught:
            Settings(**kwargs)
        assert expected in settings_error_message(caught.value), name
    IngestConfig(train_fraction=0.7, validation_fraction=0.1, test_fraction=0.2)


def test_unknown_environment_keys_are_an_error_and_settings_are_built_once(monkeypatch):
    _clean_env(monkeypatch)
    assert unknown_environment_keys({"FINSENT_TRAIN__EPOCHS": "2", "FINSENT_STATE_DIR": "x",
                                     "FINSENT_AIRFLOW_IMAGE": "img", "OTHER": "1"}) == []
    assert unknown_environment_keys({"FINSENT_SOUP_SIZE": "2", "FINSENT_TRAIN__EPOCHS": "2"}) == ["FINSENT_SOUP_SIZE"]
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("FINSENT_TRACKING_URL", "http://typo")
        with pytest.raises(ValueError, match="unknown finsent settings in the environment: FINSENT_TRACKING_URL"):
            get_settings()
        monkeypatch.delenv("FINSENT_TRACKING_URL")
        first = get_settings()
        monkeypatch.setenv("FINSENT_MODEL_NAME", "changed-later")
        assert get_settings() is first and first.model_name != "changed-later"
    finally:
        get_settings.cache_clear()


def test_the_committed_configuration_reference_is_up_to_date():
    from pathlib import Path

    from pipeline.config_reference import configuration_markdown

    committed = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert committed.read_text() == configuration_markdown(), (
        "docs/configuration.md is stale: run `.venv/bin/finsent config --markdown > docs/configuration.md`")
    assert "FINSENT_TRAIN__TEACHER_MODEL" in committed.read_text() and "soup" not in committed.read_text()


def test_the_cli_says_what_is_wrong_with_the_settings_and_exits_2(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FINSENT_")} | {"FINSENT_STATE_DIR": str(tmp_path)}
    cases = [
        (["config", "--recipe", "no-such"], {}, "invalid settings: no recipe named 'no-such'"),
        (["config"], {"FINSENT_TRAIN__LORA_R": "4"}, "invalid settings: train: lora_r applies only with finetune_method=lora"),
        (["config"], {"FINSENT_SOUP_SIZE": "4"}, "unknown finsent settings in the environment: FINSENT_SOUP_SIZE"),
        (["config", "--recipe", "fpb-minilm"], {"FINSENT_SOUP_SIZE": "4"}, "unknown finsent settings in the environment"),
    ]
    for args, extra, expected in cases:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", "--recipe", "fpb-minilm"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and '"mlm_steps": 0' in done.stdout.splitlines()[-1] and '"recipe": "fpb-minilm"' in done.stdout


def test_named_recipes_are_found_in_the_configured_folder(monkeypatch, tmp_path):
    _clean_env(monkeypatch)
    (tmp_path / "site.yaml").write_text("# site: the image's own recipe\nepochs: 2\n")
    monkeypatch.setenv("FINSENT_RECIPES_DIR", str(tmp_path))
    assert Settings(recipe="site").train.epochs == 2
    with pytest.raises(ValidationError) as caught:
        Settings(recipe="fpb-minilm")  # the repository's recipes are not in that folder
    assert "no recipe named 'fpb-minilm'; the named ones are site" in settings_error_message(caught.value)

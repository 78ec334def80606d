"""Shared fixtures: a small Financial PhraseBank subset written in the
original format, one Reuters file, a tiny BERT with a WordPiece vocabulary
trained on the fly, and settings that point at all of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import IngestConfig, ReleaseConfig, Settings, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FPB_DIR = Path(os.environ.get("FINSENT_FPB_DIR", SHARED_DATA / "financial_phrasebank")).resolve()
REUTERS_DIR = Path(os.environ.get("FINSENT_REUTERS_DIR", SHARED_DATA / "reuters21578")).resolve()
LEVEL_FILES = ["Sentences_50Agree.txt", "Sentences_66Agree.txt", "Sentences_75Agree.txt", "Sentences_AllAgree.txt"]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def write_fpb_subset(dest: Path, every: int = 10) -> Path:
    """Every ``every``-th line of 50Agree, and the lines of the other levels
    that belong to it: same bytes, latin-1, CRLF, nesting kept."""
    dest.mkdir(parents=True, exist_ok=True)
    lines50 = (FPB_DIR / LEVEL_FILES[0]).read_bytes().split(b"\r\n")
    chosen = [line for i, line in enumerate(lines50) if line and i % every == 0]
    keep = set(chosen)
    for name in LEVEL_FILES:
        lines = [line for line in (FPB_DIR / name).read_bytes().split(b"\r\n") if line in keep]
        (dest / name).write_bytes(b"".join(line + b"\r\n" for line in lines))
    return dest


@pytest.fixture(scope="session")
def fpb_subset(tmp_path_factory) -> Path:
    return write_fpb_subset(tmp_path_factory.mktemp("fpb"))


@pytest.fixture(scope="session")
def reuters_subset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reuters")
    (folder / "reut2-000.sgm").symlink_to(REUTERS_DIR / "reut2-000.sgm")
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, fpb_subset) -> Path:
    from pipeline.data.sources import read_phrasebank
    from tests.tiny_models import build_bert_from_scratch

    raw, _ = read_phrasebank(fpb_subset)
    return build_bert_from_scratch(tmp_path_factory.mktemp("tiny-bert"), raw["text"].tolist(), vocab_size=1500, max_length=64)


@pytest.fixture(scope="session")
def headless_base(tmp_path_factory, tiny_base) -> Path:
    """The tiny BERT's encoder alone, saved as BertModel: no ``cls.predictions`` weights,
    as sentence-transformers bases (the default MiniLM) ship."""
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path_factory.mktemp("headless")
    BertModel.from_pretrained(tiny_base, add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(folder)
    return folder


def tiny_train_config(base: Path) -> TrainConfig:
    return TrainConfig(
        base_model=str(base), max_length=64, mlm_steps=6, mlm_block_size=64, mlm_batch_size=8,
        mlm_max_corpus_texts=200, epochs=3, batch_size=16, learning_rate=2e-3,
    )


def slow_down_training(when, seconds: float = 1.0) -> None:
    """Makes every Trainer step of this process sleep ``seconds`` once
    ``when(trainer.state)`` holds, so that a test can kill a run between its
    first checkpoint and its end."""
    from transformers import Trainer

    training_step = Trainer.training_step

    def slow_training_step(self, *args, **kwargs):
        if when(self.state):
            time.sleep(seconds)
        return training_step(self, *args, **kwargs)

    Trainer.training_step = slow_training_step


def kill_after_first_checkpoint(driver: Path, args: dict, checkpoints: Path, work: Path, timeout: float = 120) -> None:
    """Runs ``python driver ARGS.json`` and kills it as ``kill_at_first_checkpoint`` does."""
    args_path = work / "first.json"
    args_path.write_text(json.dumps(args))
    kill_at_first_checkpoint([sys.executable, str(driver), str(args_path)], checkpoints, work / "first.log", timeout)


def kill_at_first_checkpoint(command: list[str], checkpoints: Path, log_path: Path, timeout: float = 120,
                             env: dict[str, str] | None = None) -> None:
    """Runs ``command`` (``env`` added to the environment) in a process group of
    its own and kills it and every process it started with SIGKILL once
    ``checkpoints`` holds a complete checkpoint, as a lost node dies; fails if
    the run ends first or writes none in ``timeout`` s."""
    import psutil

    from pipeline.train.checkpoints import complete_checkpoints

    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not complete_checkpoints(checkpoints) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, f"first run ended before it could be killed:\n{log_path.read_text()[-3000:]}"
        assert complete_checkpoints(checkpoints), f"no checkpoint within {timeout} s:\n{log_path.read_text()[-3000:]}"
    finally:
        # torchrun starts each worker in a session of its own, out of the group: they are killed by pid.
        try:
            started = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            started = []
        os.killpg(process.pid, signal.SIGKILL)  # its own process group (start_new_session)
        for child in started:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=30)
        psutil.wait_procs(started, timeout=30)
    assert process.returncode == -signal.SIGKILL


# The tiny test BERT's vocabulary splits words finely and its max length is 64,
# so more sentences are cut than under a real model: the share is allowed up to 20 %.
TEST_INGEST = {"min_clean_share": 0.5, "max_truncated_share": 0.2}
TEST_INGEST_ENV = {f"FINSENT_INGEST__{key.upper()}": str(value) for key, value in TEST_INGEST.items()}
# A chain through Airflow on the tiny base: seconds a step; the caller sets the base and the epochs.
TINY_CHAIN_ENV = {
    "FINSENT_TRAIN__MAX_LENGTH": "64",
    "FINSENT_TRAIN__MLM_STEPS": "4",
    "FINSENT_TRAIN__MLM_BLOCK_SIZE": "64",
    "FINSENT_TRAIN__MLM_BATCH_SIZE": "8",
    "FINSENT_TRAIN__MLM_MAX_CORPUS_TEXTS": "100",
    "FINSENT_TRAIN__BATCH_SIZE": "16",
    "FINSENT_TRAIN__LEARNING_RATE": "0.002",
    "FINSENT_RELEASE__MIN_MACRO_F1": "0.0",
}


def make_settings(project: Path, fpb: Path, reuters: Path | None, base: Path, **overrides) -> Settings:
    return Settings(
        project_dir=project, state_dir=project / ".finsent", fpb_dir=fpb, reuters_dir=reuters,
        ingest=IngestConfig(**TEST_INGEST), train=tiny_train_config(base),
        release=ReleaseConfig(min_macro_f1=0.0), **overrides,
    )


@pytest.fixture(scope="session")
def ingested(tmp_path_factory, fpb_subset, reuters_subset, tiny_base) -> Settings:
    """A project folder after one ingest run of the subsets."""
    from pipeline.data.ingest import ingest

    project = tmp_path_factory.mktemp("project")
    settings = make_settings(project, fpb_subset, reuters_subset, tiny_base)
    ingest(settings)
    return settings


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, ingested) -> Path:
    """A tiny fine-tuned classifier folder (transformers format)."""
    from pipeline.data.ingest import load_split
    from pipeline.train.classify import finetune

    out = tmp_path_factory.mktemp("finetuned")
    result = finetune(
        str(ingested.train.base_model), load_split(ingested.labeled_dir, "train"),
        load_split(ingested.labeled_dir, "validation"), out, ingested.train,
    )
    return Path(result["model_dir"])


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_classifier) -> Path:
    from pipeline.export.onnx import export_onnx

    return export_onnx(tiny_classifier, tmp_path_factory.mktemp("onnx") / "onnx", 64, "finsent-test", "7")


@pytest.fixture(scope="session")
def mlflow_service(tmp_path_factory):
    """A real MLflow tracking server (SQLite, local artifacts) on a free port: its URI and artifact folder."""
    from pipeline.services import start_mlflow_server, stop_process

    state = tmp_path_factory.mktemp("mlflow-state")
    process, uri = start_mlflow_server(state)
    yield uri, state / "mlflow" / "artifacts"
    stop_process(process)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_service) -> str:
    return mlflow_service[0]

"""A fine-tuning run killed with SIGKILL resumes from its last complete epoch
checkpoint and ends with the weights and history of a run that was never cut off;
a run that had ended is taken as it ended, without another step; a step whose
model was saved is read back, and a distillation's teachers are neither trained
nor run again.

Run as a script, this file is the driver of the run that gets killed:
``python test_finetune_resume.py ARGS.json`` fine-tunes with the arguments in the
file, each step after the first epoch slowed down so that the test can kill it
before it ends.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest


def drive(args_path: Path) -> None:
    from pipeline.config import TrainConfig
    from pipeline.data.ingest import load_split
    from pipeline.train.classify import finetune
    from tests.conftest import slow_down_training

    args = json.loads(args_path.read_text())
    slow_down_training(lambda state: state.epoch >= 1)
    labeled = Path(args["labeled_dir"])
    finetune(args["base"], load_split(labeled, "train"), load_split(labeled, "validation"), Path(args["out_dir"]),
             TrainConfig(**args["cfg"]))


def count_training_steps(monkeypatch) -> list[int]:
    """The global step of each training step taken in this process from now on."""
    from transformers import Trainer

    steps: list[int] = []
    training_step = Trainer.training_step

    def counted(self, *a, **kw):
        steps.append(self.state.global_step)
        return training_step(self, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", counted)
    return steps


def weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(model_dir) / "model.safetensors")


def evaluations(history: list[dict]) -> list[tuple[float, float]]:
    return [(entry["epoch"], entry["eval_macro_f1"]) for entry in history if "eval_macro_f1" in entry]


@pytest.mark.parametrize("option", [{}, {"ema_decay": 0.9}], ids=["plain", "weight-average"])
def test_killed_finetuning_resumes_and_ends_as_an_uncut_run(tmp_path, ingested, caplog, monkeypatch, option):
    from pipeline.data.ingest import load_split
    from pipeline.train.checkpoints import complete_checkpoints
    from pipeline.train.classify import finetune
    from tests.conftest import kill_after_first_checkpoint

    cfg = ingested.train.model_copy(update=option)
    train, validation = load_split(ingested.labeled_dir, "train"), load_split(ingested.labeled_dir, "validation")
    base = str(ingested.train.base_model)
    uncut = finetune(base, train, validation, tmp_path / "uncut", cfg)
    assert uncut["resumed_from_epoch"] == 0

    out = tmp_path / "cut"
    checkpoints = out / "checkpoints"
    kill_after_first_checkpoint(
        Path(__file__), {"base": base, "labeled_dir": str(ingested.labeled_dir), "out_dir": str(out),
                         "cfg": cfg.model_dump()}, checkpoints, tmp_path,
    )
    last_step, last = complete_checkpoints(checkpoints)[-1]
    assert not (checkpoints / "finished.json").exists() and not (out / "model").exists()
    # A checkpoint cut off while saving (the state file is written last): resuming must skip it.
    half_written = checkpoints / f"checkpoint-{last_step * 2}"
    half_written.mkdir(exist_ok=True)
    (half_written / "model.safetensors").write_bytes(b"\0" * 100)

    steps = count_training_steps(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        resumed = finetune(base, train, validation, out, cfg)
    epoch = resumed["resumed_from_epoch"]
    assert 1 <= epoch < cfg.epochs
    steps_per_epoch = last_step // epoch
    assert len(steps) == (cfg.epochs - epoch) * steps_per_epoch, "the resumed run did not start from its checkpoint"
    assert f"resuming fine-tuning from {last} (epoch {epoch} of {cfg.epochs})" in caplog.text
    assert f"ignoring and removing the incomplete checkpoint {half_written}" in caplog.text
    # The same weights and history as the run that was never cut off: optimizer, scheduler, RNG, data
    # order and (with it) the moving average all came back from the checkpoint.
    assert evaluations(resumed["history"]) == evaluations(uncut["history"])
    assert resumed["best_epoch"] == uncut["best_epoch"] and resumed["epochs_run"] == cfg.epochs
    expected, got = weights(uncut["model_dir"]), weights(resumed["model_dir"])
    assert expected.keys() == got.keys()
    assert all((expected[name] == got[name]).all() for name in expected), "resumed weights differ from the uncut run's"

    # Once more (a task retried after the step saved its model): its result is read back, nothing trains.
    steps.clear()
    again = finetune(base, train, validation, out, cfg)
    assert not steps and again["from_saved_result"]
    assert {**again, "from_saved_result": None} == {**resumed, "from_saved_result": None}
    # A worker killed after training ended but before the result was written: the checkpoints say the run had
    # ended, so the Trainer takes no step and only loads the best epoch.
    (out / "finetune_result.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        again = finetune(base, train, validation, out, cfg)
    assert not steps and "from_saved_result" not in again
    assert f"had ended at epoch {cfg.epochs}: taking its best checkpoint" in caplog.text
    assert again["resumed_from_epoch"] == cfg.epochs and evaluations(again["history"]) == evaluations(uncut["history"])
    final = weights(again["model_dir"])
    assert all((expected[name] == final[name]).all() for name in expected)

    # Other settings do not resume from these checkpoints.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        changed = finetune(base, train, validation, out, cfg.model_copy(update={"epochs": 1}))
    assert changed["resumed_from_epoch"] == 0 and changed["epochs_run"] == 1
    assert "settings or data changed since the checkpoints" in caplog.text


class Interrupted(Exception):
    pass


def interrupt_after_epoch(monkeypatch, epoch: int, in_folder: str | None = None) -> None:
    """Every Trainer built from now on (with ``in_folder``, only those of runs in
    a folder of that name) raises ``Interrupted`` right after saving the
    checkpoint of ``epoch``, as a killed worker would stop there."""
    from transformers import Trainer, TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            # A run's checkpoints are in <its folder>/checkpoints.
            if round(state.epoch) == epoch and in_folder in (None, Path(args.output_dir).parent.name):
                raise Interrupted

    init = Trainer.__init__

    def with_stop(self, *a, **kw):
        init(self, *a, **kw)
        self.add_callback(Stop())

    monkeypatch.setattr(Trainer, "__init__", with_stop)


def test_early_stopping_carries_over_a_resume_and_a_stopped_run_is_not_trained_further(tmp_path, ingested, monkeypatch):
    from transformers import Trainer

    from pipeline.data.ingest import load_split
    from pipeline.train.classify import finetune

    # With a learning rate of 0 the weights stay put, so validation macro-F1 cannot improve after the first
    # epoch: with patience 2 an uncut run stops after epoch 3, whatever the tiny model would have learned.
    cfg = ingested.train.model_copy(update={"epochs": 8, "early_stopping_patience": 2, "learning_rate": 0.0})
    train, validation = load_split(ingested.labeled_dir, "train"), load_split(ingested.labeled_dir, "validation")
    init = Trainer.__init__
    interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(Interrupted):
        finetune(str(cfg.base_model), train, validation, tmp_path, cfg)
    monkeypatch.setattr(Trainer, "__init__", init)

    # Resumed after epoch 2, the run has one epoch without improvement behind it: had the early-stopping
    # counter started again from 0, it would stop after epoch 4.
    resumed = finetune(str(cfg.base_model), train, validation, tmp_path, cfg)
    assert resumed["resumed_from_epoch"] == 2
    assert resumed["stopped_early"] and resumed["epochs_run"] == 3

    steps = count_training_steps(monkeypatch)
    (tmp_path / "finetune_result.json").unlink()  # as if killed before the saved result: the checkpoints decide
    again = finetune(str(cfg.base_model), train, validation, tmp_path, cfg)
    assert not steps, "the retry trained on past the early stop"
    assert again["resumed_from_epoch"] == 3 and again["stopped_early"]
    assert evaluations(again["history"]) == evaluations(resumed["history"])


def test_a_retried_soup_takes_its_finished_members_as_they_are(tmp_path, ingested, monkeypatch):
    from transformers import Trainer

    from pipeline.data.ingest import load_split
    from pipeline.train.classify import finetune

    cfg = ingested.train.model_copy(update={"soup_size": 2, "soup_method": "uniform", "epochs": 2})
    train, validation = load_split(ingested.labeled_dir, "train"), load_split(ingested.labeled_dir, "validation")
    base = str(ingested.train.base_model)
    uncut = finetune(base, train, validation, tmp_path / "uncut", cfg)
    assert not list((tmp_path / "uncut").glob("member-*")), "members' checkpoints outlived the saved soup"

    init = Trainer.__init__
    interrupt_after_epoch(monkeypatch, 1, in_folder="member-1")  # a killed worker, after member 1's first epoch
    with pytest.raises(Interrupted):
        finetune(base, train, validation, tmp_path / "cut", cfg)
    monkeypatch.setattr(Trainer, "__init__", init)

    steps = count_training_steps(monkeypatch)
    resumed = finetune(base, train, validation, tmp_path / "cut", cfg)
    members = resumed["soup"]["members"]
    assert [m["resumed_from_epoch"] for m in members] == [2, 1]  # the first had ended, the second resumes
    # Only member 1's second epoch ran: no step of member 0, none from member 1's start.
    assert steps and min(steps) == len(steps), "a member trained from its first step again"
    assert [{**m, "resumed_from_epoch": 0} for m in members] == uncut["soup"]["members"]
    expected, got = weights(uncut["model_dir"]), weights(resumed["model_dir"])
    assert all((expected[name] == got[name]).all() for name in expected), "the resumed soup differs from the uncut one"


def count_teacher_scorings(monkeypatch) -> list[int]:
    """The number of texts of each call that scores texts with a classifier from now on."""
    from pipeline.train import classify

    calls: list[int] = []
    predict = classify.predict_logits

    def counted(model, tokenizer, texts, *args, **kwargs):
        calls.append(len(texts))
        return predict(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(classify, "predict_logits", counted)
    return calls


@pytest.mark.parametrize("recipe", ["ensemble", "teacher", "self-training"])
def test_a_distillation_retried_while_its_student_trains_neither_trains_nor_runs_its_teachers_again(
        tmp_path, ingested, tiny_classifier, monkeypatch, recipe):
    import pandas as pd
    from transformers import Trainer

    from pipeline.data.ingest import load_split
    from pipeline.train.classify import finetune

    options = {
        "ensemble": {"distill_teachers": 2},
        "teacher": {"teacher_model": str(tiny_classifier), "distill_corpus_texts": 40},
        "self-training": {"self_training_texts": 30, "self_training_candidates": 120},
    }[recipe]
    cfg = ingested.train.model_copy(update={"epochs": 2, **options})
    train = load_split(ingested.labeled_dir, "train").sample(n=96, random_state=0).reset_index(drop=True)
    validation = load_split(ingested.labeled_dir, "validation")
    corpus = pd.read_parquet(ingested.corpus_path)["text"].tolist()
    base, out = str(ingested.train.base_model), tmp_path / "step"

    init = Trainer.__init__
    interrupt_after_epoch(monkeypatch, 1, in_folder="step")  # the student's run; teachers train in their own folders
    scorings = count_teacher_scorings(monkeypatch)
    with pytest.raises(Interrupted):
        finetune(base, train, validation, out, cfg, corpus=corpus)
    monkeypatch.setattr(Trainer, "__init__", init)
    assert scorings, "the teachers scored nothing"

    steps = count_training_steps(monkeypatch)
    scorings.clear()
    resumed = finetune(base, train, validation, out, cfg, corpus=corpus)
    assert not scorings, "the retry ran a teacher again"
    # The student trained on the targets its checkpoints were written with, so it resumed; no teacher step ran.
    assert resumed["resumed_from_epoch"] == 1
    steps_per_epoch = -(-max(entry["step"] for entry in resumed["history"]) // cfg.epochs)
    assert len(steps) == steps_per_epoch and min(steps) == steps_per_epoch
    helpers = [p.name for p in out.iterdir() if p.name.startswith("teacher")]
    assert not helpers, f"{helpers} outlived the saved student"

    # Retried once more, after the student was saved: read back, nothing trains or scores.
    steps.clear()
    again = finetune(base, train, validation, out, cfg, corpus=corpus)
    assert again["from_saved_result"] and not steps and not scorings
    assert {**again, "from_saved_result": None} == {**resumed, "from_saved_result": None}


def test_a_teachers_scores_are_kept_for_its_weights_and_texts_only(tmp_path):
    import numpy as np

    from pipeline.train.checkpoints import cached_scores

    calls = []

    def score(value: float):
        def compute():
            calls.append(value)
            return {"train": np.full((2, 3), value, dtype=np.float32)}
        return compute

    path = tmp_path / "teacher_scores.npz"
    assert cached_scores(path, {"teacher": "a"}, score(1.0))["train"][0, 0] == 1.0
    assert cached_scores(path, {"teacher": "a"}, score(2.0))["train"][0, 0] == 1.0 and calls == [1.0]
    assert cached_scores(path, {"teacher": "b"}, score(3.0))["train"][0, 0] == 3.0 and calls == [1.0, 3.0]
    for unreadable in (path.read_bytes()[:200], b"not a zip"):  # a truncated archive, then another file
        path.write_bytes(unreadable)  # is scored again, not an error
        assert cached_scores(path, {"teacher": "b"}, score(4.0))["train"][0, 0] == 4.0
        assert calls[-1] == 4.0 and cached_scores(path, {"teacher": "b"}, score(5.0))["train"][0, 0] == 4.0
    assert not list(tmp_path.glob(".partial-*"))


if __name__ == "__main__":
    drive(Path(sys.argv[1]))

"""A fine-tuning run killed with SIGKILL resumes from its last complete epoch
checkpoint and ends with the weights and history of a run that was never cut off;
a run that had ended is taken as it ended, without another step; a step whose
model was saved is read back, and a distillation's teacher is not run again.

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


def test_killed_finetuning_resumes_and_ends_as_an_uncut_run(tmp_path, ingested, caplog, monkeypatch):
    from pipeline.data.ingest import load_split
    from pipeline.train.checkpoints import complete_checkpoints
    from pipeline.train.classify import finetune
    from tests.conftest import kill_after_first_checkpoint

    cfg = ingested.train
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
    # The same weights and history as the run that was never cut off: optimizer, scheduler, RNG and
    # data order all came back from the checkpoint.
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


def interrupt_after_epoch(monkeypatch, epoch: int) -> None:
    """Every Trainer built from now on raises ``Interrupted`` right after saving
    the checkpoint of ``epoch``, as a killed worker would stop there."""
    from transformers import Trainer, TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if round(state.epoch) == epoch:
                raise Interrupted

    init = Trainer.__init__

    def with_stop(self, *a, **kw):
        init(self, *a, **kw)
        self.add_callback(Stop())

    monkeypatch.setattr(Trainer, "__init__", with_stop)


def count_teacher_scorings(monkeypatch) -> list[int]:
    """The number of texts of each call that scores texts with a classifier from now on."""
    from pipeline.train import distill

    calls: list[int] = []
    predict = distill.predict_logits

    def counted(model, tokenizer, texts, *args, **kwargs):
        calls.append(len(texts))
        return predict(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(distill, "predict_logits", counted)
    return calls


def test_a_distillation_retried_while_its_student_trains_does_not_run_its_teacher_again(
        tmp_path, ingested, tiny_classifier, monkeypatch):
    import pandas as pd
    from transformers import Trainer

    from pipeline.data.ingest import load_split
    from pipeline.train.classify import finetune

    cfg = ingested.train.model_copy(update={"epochs": 2, "teacher_model": str(tiny_classifier), "distill_corpus_texts": 40})
    train = load_split(ingested.labeled_dir, "train").sample(n=96, random_state=0).reset_index(drop=True)
    validation = load_split(ingested.labeled_dir, "validation")
    corpus = pd.read_parquet(ingested.corpus_path)["text"].tolist()
    base, out = str(ingested.train.base_model), tmp_path / "step"

    init = Trainer.__init__
    interrupt_after_epoch(monkeypatch, 1)
    scorings = count_teacher_scorings(monkeypatch)
    with pytest.raises(Interrupted):
        finetune(base, train, validation, out, cfg, corpus=corpus)
    monkeypatch.setattr(Trainer, "__init__", init)
    assert scorings, "the teacher scored nothing"

    steps = count_training_steps(monkeypatch)
    scorings.clear()
    resumed = finetune(base, train, validation, out, cfg, corpus=corpus)
    assert not scorings, "the retry ran a teacher again"
    # The student trained on the targets its checkpoints were written with, so it resumed.
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

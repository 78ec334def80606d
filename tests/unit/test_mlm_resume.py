"""A masked-LM run killed with SIGKILL resumes from its last complete
checkpoint: same step count in the end, fewer steps taken the second time,
one trainer history across both processes, and the losses and adapted model
of a run never cut off.

Run as a script, this file is the driver of the run that gets killed:
``python test_mlm_resume.py ARGS.json`` calls adapt_mlm with the arguments in
the file, each step after the first checkpoint slowed down so that the test
can kill it before it ends.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

STEPS, EVERY = 30, 5


def drive(args_path: Path) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    from pipeline.config import TrainConfig
    from pipeline.train.mlm import adapt_mlm
    from tests.conftest import slow_down_training

    args = json.loads(args_path.read_text())
    slow_down_training(lambda state: state.global_step >= EVERY)
    result = adapt_mlm(args["base"], args["corpus"], args["validation"], Path(args["out_dir"]), TrainConfig(**args["cfg"]))
    (Path(args["out_dir"]) / "result.json").write_text(json.dumps(result.to_dict()))


def test_killed_mlm_run_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_base, fpb_subset, caplog):
    from pipeline.data.sources import read_phrasebank
    from pipeline.train.checkpoints import complete_checkpoints
    from pipeline.train.mlm import adapt_mlm
    from tests.conftest import kill_after_first_checkpoint, tiny_train_config

    raw, _ = read_phrasebank(fpb_subset)
    texts = raw.loc[raw["error"].isna(), "text"].tolist()
    out = tmp_path / "mlm"
    cfg = tiny_train_config(tiny_base).model_copy(
        update={"mlm_steps": STEPS, "checkpoint_steps": EVERY, "mlm_block_size": 32, "mlm_batch_size": 4}
    )
    args = {"base": str(tiny_base), "corpus": texts[:-24], "validation": texts[-24:], "out_dir": str(out),
            "cfg": cfg.model_dump()}
    checkpoints = out / "checkpoints"

    kill_after_first_checkpoint(Path(__file__), args, checkpoints, tmp_path, timeout=60)
    assert not (out / "result.json").exists()
    last_step, last = complete_checkpoints(checkpoints)[-1]
    assert 0 < last_step < STEPS
    # A checkpoint cut off while saving (the state file is written last): resuming must skip it.
    half_written = checkpoints / f"checkpoint-{last_step + EVERY}"
    if not half_written.exists():
        half_written.mkdir()
        (half_written / "model.safetensors").write_bytes(b"\0" * 100)

    # The second run, here in the test process, goes to the end.
    with caplog.at_level(logging.INFO, logger="pipeline.train.mlm"):
        result = adapt_mlm(args["base"], args["corpus"], args["validation"], out, cfg).to_dict()
    json.dumps(result)  # JSON-able, history included

    assert result["resumed_from_step"] == last_step
    assert f"resuming masked-LM training from {last} (step {last_step} of {STEPS})" in caplog.text
    assert f"ignoring and removing the incomplete checkpoint {half_written}" in caplog.text
    assert result["steps"] == STEPS and result["steps_run"] == STEPS - last_step
    # One history across both processes: the first run's entries come back with the checkpoint.
    logged = [entry["step"] for entry in result["history"] if "loss" in entry]
    assert logged == sorted(set(logged)), "steps logged twice or out of order: the run restarted"
    assert logged[0] <= last_step < logged[-1] and result["history"][-1]["step"] == STEPS
    final_state = json.loads((checkpoints / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert final_state["global_step"] == STEPS
    assert [e["step"] for e in final_state["log_history"] if "loss" in e] == logged
    assert all(step >= last_step for step, _ in complete_checkpoints(checkpoints))  # save_total_limit rotates
    # The same masks, dropout and data order as a run never cut off: the same losses and adapted model.
    uncut = adapt_mlm(args["base"], args["corpus"], args["validation"], tmp_path / "uncut", cfg).to_dict()
    assert [(e["step"], e["loss"]) for e in uncut["history"] if "loss" in e] == \
        [(e["step"], e["loss"]) for e in result["history"] if "loss" in e]
    assert result["perplexity_adapted"] == uncut["perplexity_adapted"]

    # Once more (a retried task): the finished checkpoint is taken as it is, no extra step.
    again = adapt_mlm(args["base"], args["corpus"], args["validation"], out, cfg)
    assert (again.resumed_from_step, again.steps_run, again.steps) == (STEPS, 0, STEPS)
    assert again.perplexity_adapted == pytest.approx(result["perplexity_adapted"])


if __name__ == "__main__":
    drive(Path(sys.argv[1]))

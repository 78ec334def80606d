"""DistributedDataParallel on CPU: two gloo processes under torchrun, each with
half the batch, follow the same loss curve as one process with the whole
batch (same global batch, same order, no dropout), and a two-process run
killed mid-run resumes from its checkpoint. Masked-LM adaptation under
torchrun keeps the processes' weights in step, writes one complete folder, and
resumes a killed run as it would have ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from pipeline import services
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def no_dropout_base(tmp_path_factory, tiny_base):
    """The tiny BERT with dropout off: the two runs differ only in how the batch is split."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("no-dropout")
    config = AutoConfig.from_pretrained(tiny_base)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    AutoModelForMaskedLM.from_pretrained(tiny_base, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(folder)
    return folder


def _run(command: list[str], out, tmp_path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINSENT_")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())


def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path, no_dropout_base, ingested):
    driver = str(REPO / "tests" / "e2e" / "ddp_driver.py")
    data = str(ingested.labeled_dir)
    single = _run([sys.executable, driver, str(no_dropout_base), data, str(tmp_path / "one.json"), "16"],
                  tmp_path / "one.json", tmp_path)
    torchrun = lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",  # noqa: E731
                        "--master_addr", "127.0.0.1", "--master_port", str(services.free_port())]
    ddp = _run([*torchrun(), driver, str(no_dropout_base), data, str(tmp_path / "two.json"), "8"],
               tmp_path / "two.json", tmp_path)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    curve = lambda run, key: [h[key] for h in run["history"] if key in h]  # noqa: E731
    # The training loss curve, and validation scores of the gathered predictions (the validation loss
    # is left out: the Trainer averages it over per-process batches padded with repeated rows).
    for key in ("loss", "eval_macro_f1", "eval_accuracy"):
        assert len(curve(single, key)) == len(curve(ddp, key)) == 3, key
        assert curve(ddp, key) == pytest.approx(curve(single, key), rel=1e-3, abs=1e-4), key

    # Run again (a retried task): both processes read the saved run's result back and train nothing.
    again = _run([*torchrun(), driver, str(no_dropout_base), data, str(tmp_path / "again.json"), "8"],
                 tmp_path / "again.json", tmp_path)
    assert (ddp["from_saved_result"], again["from_saved_result"]) == (False, True)
    for key in ("loss", "eval_macro_f1", "eval_accuracy"):
        assert curve(again, key) == curve(ddp, key), key

    # Killed (the whole torchrun group) once the first epoch's checkpoint is complete: the retry resumes from
    # it in both processes (each reads back its own RNG state, rng_state_<rank>.pth) and ends as the uncut run.
    from tests.conftest import kill_at_first_checkpoint

    command = [*torchrun(), driver, str(no_dropout_base), data, str(tmp_path / "cut.json"), "8", "work-cut"]
    kill_at_first_checkpoint(command, tmp_path / "work-cut" / "checkpoints", tmp_path / "cut.log",
                             env={"SLOW_AFTER_FIRST_EPOCH": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert not (tmp_path / "cut.json").exists()
    resumed = _run(command, tmp_path / "cut.json", tmp_path)
    assert resumed["resumed_from_epoch"] == 1
    for key in ("loss", "eval_macro_f1", "eval_accuracy"):
        assert curve(resumed, key) == curve(ddp, key), key


@pytest.mark.parametrize("head", ["own", "new"])
def test_masked_lm_adaptation_under_two_gloo_processes(tmp_path, tiny_base, headless_base, ingested, head):
    """``new``: a base without a masked-LM head, whose head is fitted alone first (two Trainers
    in a row, both under DistributedDataParallel)."""
    from transformers import AutoModelForMaskedLM

    base = tiny_base if head == "own" else headless_base
    driver = str(REPO / "tests" / "e2e" / "ddp_driver.py")
    out = tmp_path / "mlm"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINSENT_")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(services.free_port()), driver, "mlm", str(base),
                           str(ingested.labeled_dir), str(out)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"mlm.rank{rank}.json").read_text()) for rank in (0, 1)]
    # Each process trained on other rows; gradients averaged over both keep the weights equal.
    assert ranks[0]["perplexity_adapted"] == ranks[1]["perplexity_adapted"] != ranks[0]["perplexity_base"]
    assert ranks[0]["used"] == ranks[1]["used"] == "adapted" and ranks[0]["model_dir"] == ranks[1]["model_dir"]
    if head == "new":  # the fitted head is the same in both processes too
        assert ranks[0]["head_fit_steps"] == ranks[1]["head_fit_steps"] == 6
        assert ranks[0]["perplexity_base"] == ranks[1]["perplexity_base"] < ranks[0]["perplexity_random_head"]
    else:
        assert ranks[0]["head_fit_steps"] == 0
    folder = ranks[0]["model_dir"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "work-mlm" / "model" / name).is_file(), name
    model, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert model.config.architectures == ["BertForMaskedLM"] and not info["missing_keys"]


def test_masked_lm_adaptation_killed_under_two_gloo_processes_ends_as_an_uncut_run(tmp_path, tiny_base, ingested):
    from tests.conftest import kill_at_first_checkpoint

    driver = str(REPO / "tests" / "e2e" / "ddp_driver.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINSENT_")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")

    def command(name: str) -> list[str]:  # 12 steps, a checkpoint every 4, in the folder work-<name>
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(services.free_port()), driver, "mlm", str(tiny_base), str(ingested.labeled_dir),
                str(tmp_path / name), "12", "4", f"work-{name}"]

    def results(name: str) -> list[dict]:
        done = subprocess.run(command(name), env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return [json.loads((tmp_path / f"{name}.rank{rank}.json").read_text()) for rank in (0, 1)]

    uncut = results("uncut")
    # Both processes killed (torchrun's whole group) once a checkpoint is complete; every rank's RNG state,
    # rng_state_<rank>.pth, is in it.
    kill_at_first_checkpoint(command("cut"), tmp_path / "work-cut" / "checkpoints", tmp_path / "cut.log",
                             env={**env, "SLOW_AFTER_STEP": "4"})
    resumed = results("cut")
    assert resumed[0]["resumed_from_step"] == resumed[1]["resumed_from_step"] > 0
    assert resumed[0]["steps"] == 12 and resumed[0]["steps_run"] == 12 - resumed[0]["resumed_from_step"]
    # The same data order, masks and dropout as the uncut run from the checkpoint on: the same adapted model.
    for rank in (0, 1):
        assert resumed[rank]["perplexity_adapted"] == uncut[rank]["perplexity_adapted"]
    losses = lambda run: [(e["step"], e["loss"]) for e in run["history"] if "loss" in e]  # noqa: E731
    assert losses(resumed[0]) == losses(uncut[0])

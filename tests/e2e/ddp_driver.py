"""Fine-tunes with the project's ``finetune`` under whatever launched it (plain
python, or torchrun with several processes) and, on rank 0, writes the
Trainer's log history to the JSON file named on the command line:
``ddp_driver.py MODEL DATA OUT BATCH [WORK]``, in the folder WORK beside OUT
(default ``work-BATCH``). With ``SLOW_AFTER_FIRST_EPOCH`` set, every step after
the first epoch sleeps a second, so that a test can kill the run there.

``ddp_driver.py mlm MODEL DATA OUT [STEPS EVERY WORK]``: runs ``adapt_mlm``
instead (STEPS steps, a checkpoint every EVERY, 0 for none, in WORK; default
6, 0, ``work-mlm``), and every process writes its result to
``OUT.rank<N>.json``. With ``SLOW_AFTER_STEP`` set, every step from that one
on sleeps a second."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from pipeline.config import TrainConfig
from pipeline.train.classify import finetune
from pipeline.train.mlm import adapt_mlm


def sequential_batches() -> None:
    """Rows in file order instead of length-bucketed shuffled batches, so that one process
    with batch 16 and two with batch 8 see the same rows in each step and their curves compare."""
    from transformers import TrainingArguments

    post_init = TrainingArguments.__post_init__

    def sequential(self):
        self.train_sampling_strategy = "sequential"
        post_init(self)

    TrainingArguments.__post_init__ = sequential


def main(model_dir: str, data_dir: str, out: str, batch_size: int, work: str | None = None) -> None:
    if os.environ.get("SLOW_AFTER_FIRST_EPOCH"):
        from tests.conftest import slow_down_training

        slow_down_training(lambda state: state.epoch >= 1)
    sequential_batches()
    cfg = TrainConfig(base_model=model_dir, max_length=64, epochs=3, batch_size=batch_size, learning_rate=2e-3, seed=0)
    train = pd.read_parquet(Path(data_dir) / "train.parquet")
    # Whole batches only: torch's DistributedSampler would pad a last partial batch with repeated rows.
    train = train.head(len(train) // 16 * 16)
    validation = pd.read_parquet(Path(data_dir) / "validation.parquet")
    # An even count: each process evaluates an equal half, so the mean of their losses is the overall mean.
    validation = validation.head(len(validation) // 2 * 2)
    result = finetune(model_dir, train, validation, Path(out).parent / (work or f"work-{batch_size}"), cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "history": result["history"], "resumed_from_epoch": result["resumed_from_epoch"],
            "from_saved_result": result.get("from_saved_result", False),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }))


def adapt(model_dir: str, data_dir: str, out: str, steps: str = "6", every: str = "0", work: str = "work-mlm") -> None:
    if os.environ.get("SLOW_AFTER_STEP"):
        from tests.conftest import slow_down_training

        slow_down_training(lambda state: state.global_step >= int(os.environ["SLOW_AFTER_STEP"]))
    cfg = TrainConfig(base_model=model_dir, max_length=64, mlm_steps=int(steps), mlm_block_size=64, mlm_batch_size=4,
                      mlm_margin=-1.0, checkpoint_steps=int(every), seed=0)
    texts = pd.read_parquet(Path(data_dir) / "train.parquet")["text"].tolist()
    validation = pd.read_parquet(Path(data_dir) / "validation.parquet")["text"].tolist()
    result = adapt_mlm(model_dir, texts, validation, Path(out).parent / work, cfg)
    Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result.to_dict()))


if __name__ == "__main__":
    if sys.argv[1] == "mlm":
        adapt(*sys.argv[2:])
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])

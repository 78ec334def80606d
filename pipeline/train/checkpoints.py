"""Training checkpoints (masked-LM adaptation and fine-tuning): which ones were
written to the end, and whether they belong to a run with the same settings and
data (then it resumes). Also what a retried fine-tuning step takes as it was
instead of computing it again: a saved model's result, a teacher's scores."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the folder of a step's checkpoints, in its run folder
FINGERPRINT = "fingerprint.json"
RESULT = "finetune_result.json"  # a fine-tuning call's result, written once its model is saved
TEACHER_SCORES = "teacher_scores.npz"  # a teacher's probabilities, kept for a retry
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# What HF Trainer writes into a checkpoint; trainer_state.json comes last. The RNG state is
# rng_state.pth in one process, rng_state_<rank>.pth from each process under torchrun.
_CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")
_RNG_FILES = re.compile(r"^rng_state(_\d+)?\.pth$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints that were written to the end, oldest first.
    Trainer writes trainer_state.json last, so a folder whose state file is
    missing, unreadable or of another step was cut off while saving."""
    found = []
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if not match or not path.is_dir():
            continue
        step = int(match.group(1))
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        files_ok = all((path / name).is_file() and (path / name).stat().st_size > 0 for name in _CHECKPOINT_FILES)
        files_ok = files_ok and any(_RNG_FILES.match(file.name) and file.stat().st_size > 0 for file in path.iterdir())
        weights_ok = any((path / name).is_file() and (path / name).stat().st_size > 0 for name in _WEIGHT_FILES)
        if files_ok and weights_ok and state.get("global_step") == step:
            found.append((step, path))
    return sorted(found)


def prepare_checkpoint_dir(folder: Path, fingerprint: dict) -> tuple[int, Path | None]:
    """The last complete checkpoint of a run with the same settings, if any;
    drops checkpoints of other settings and half-written checkpoint folders."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / FINGERPRINT
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        previous = None
    if previous != fingerprint:
        stale = [p for p in folder.iterdir() if p.name != FINGERPRINT]
        if stale:
            log.warning("settings or data changed since the checkpoints in %s were written: starting over", folder)
        for path in stale:  # under torchrun every process does this at once: what another removed is gone
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        marker.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        return 0, None
    complete = complete_checkpoints(folder)
    good = {path for _, path in complete}
    for path in folder.iterdir():
        if path.is_dir() and _CHECKPOINT_NAME.match(path.name) and path not in good:
            log.warning("ignoring and removing the incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
    if not complete:
        return 0, None
    return complete[-1]


def mlm_fingerprint(base_model: str, corpus_texts: list[str], cfg: TrainConfig) -> dict:
    keys = ["mlm_steps", "mlm_block_size", "mlm_batch_size", "mlm_learning_rate", "mlm_probability", "seed",
            "warmup_ratio", "weight_decay", "max_length", "mlm_head_steps"]
    return {"base_model": str(base_model), "corpus_sha256": texts_sha256(corpus_texts),
            **{key: getattr(cfg, key) for key in keys}}


def texts_sha256(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "replace") + b"\x00")
    return digest.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """The digest of a model folder's weight files (a second or so for a
    bert-base-sized model): what scores computed with them belong to."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin"):
            digest.update(path.name.encode() + b"\x00")
            with path.open("rb") as weights:
                while chunk := weights.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()


def finetune_fingerprint(model_dir: str, train: pd.DataFrame, validation: pd.DataFrame, cfg: TrainConfig) -> dict:
    """What a fine-tuning run's checkpoints belong to: the starting model, every
    row of both splits (targets included: a teacher's probabilities change the
    run) and the whole config, since any option may change the training."""
    digest = hashlib.sha256()
    for frame in (train, validation):
        digest.update(frame.to_json(orient="split", double_precision=15).encode("utf-8"))
    return {"model_dir": str(model_dir), "rows_sha256": digest.hexdigest(),
            "config": cfg.model_dump(mode="json")}


def remove_checkpoint_folders(run_folder: Path) -> int:
    """Removes every checkpoint folder under ``run_folder`` (once the run's model is
    registered they serve no retry); returns the bytes freed."""
    freed = 0
    for folder in sorted(run_folder.rglob(CHECKPOINTS)):
        if folder.is_dir():
            freed += sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
            shutil.rmtree(folder)
    return freed


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a file beside ``path``, then renamed onto it: a process killed
    while writing leaves the old file or none, never half of one."""
    partial = path.with_name(f".partial-{path.name}")
    write(partial)
    os.replace(partial, path)


def saved_result(out_dir: Path, fingerprint: dict) -> dict | None:
    """The result a fine-tuning call with this fingerprint saved in ``out_dir``,
    if there is one and the model it names is still there."""
    try:
        saved = json.loads((out_dir / RESULT).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("fingerprint") != fingerprint:
        return None  # another call's (the student's of a composite step writes here too), or other settings
    model = Path(saved["result"]["model_dir"])
    if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
        return None
    return saved["result"]


def save_result(out_dir: Path, fingerprint: dict, result: dict) -> None:
    text = json.dumps({"fingerprint": fingerprint, "result": result}, indent=1)
    _write_atomically(out_dir / RESULT, lambda path: path.write_text(text))


def cached_scores(path: Path, key: dict, score: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays ``score`` returns, kept in ``path`` (``.npz``) for a retry with
    the same ``key``: a retried distillation step takes its teacher's
    probabilities from there instead of loading and running the teacher again.
    The student's checkpoints were trained on exactly these targets, so reading
    them back (not scoring again, perhaps on other hardware) lets it resume."""
    key_text = json.dumps(key, sort_keys=True)
    try:
        with np.load(path) as saved:
            if str(saved["key"]) == key_text:
                return {name: saved[name] for name in saved.files if name != "key"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # none yet, or not one this code wrote whole
        pass
    arrays = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The partial file's name ends in .npz as ``path``'s does, so np.savez adds no suffix of its own.
    _write_atomically(path, lambda partial: np.savez(partial, key=np.array(key_text), **arrays))
    return arrays

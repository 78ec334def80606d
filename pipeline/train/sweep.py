"""A small fine-tuning sweep: the grid of trials and the choice of the best
by validation macro-F1. The train DAG maps fine-tuning over the trials with
dynamic task mapping; ``finsent train`` runs them one after the other."""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

from pipeline.config import TrainConfig


def sweep_trials(cfg: TrainConfig) -> list[dict]:
    """One dict of overrides per trial (``trial`` numbers them); a single
    trial with the configured values when no sweep is set."""
    rates = cfg.sweep_learning_rates or [cfg.learning_rate]
    seeds = cfg.sweep_seeds or [cfg.seed]
    return [
        {"trial": number, "learning_rate": rate, "seed": seed}
        for number, (rate, seed) in enumerate(itertools.product(rates, seeds))
    ]


def trial_config(cfg: TrainConfig, trial: dict) -> TrainConfig:
    return cfg.model_copy(update={key: value for key, value in trial.items() if key in TrainConfig.model_fields})


def best_trial(results: list[dict]) -> dict:
    """The trial with the highest validation macro-F1; ties go to the earlier trial."""
    if not results:
        raise ValueError("the sweep produced no results")
    return max(results, key=lambda r: (r["best_val_macro_f1"], -r["trial"]["trial"]))


def log_sweep(settings, run_id: str, results: list[dict], best: dict) -> None:
    """The sweep table and the winner, on the training run."""
    import mlflow

    from pipeline import registry

    registry.connect(settings)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as folder:
        table = [{**r["trial"], "best_val_macro_f1": r["best_val_macro_f1"], "model_dir": r["model_dir"]} for r in results]
        path = Path(folder) / "sweep_results.json"
        path.write_text(json.dumps({"trials": table, "best": best["trial"]}, indent=2))
        mlflow.log_artifact(str(path), "sweep")
        mlflow.log_params({"sweep_trials": len(results), **{f"sweep_best_{k}": v for k, v in best["trial"].items()}})

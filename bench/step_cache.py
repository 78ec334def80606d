"""The step cache: wall time of ``finsent train`` on a fresh MLflow server,
then again with nothing changed (the run is reused), then with ``--no-cache``
(trains again), each as its own process, as a person or a task runs it.

    .venv/bin/python bench/step_cache.py --recipe demo --epochs 1

Works in a fresh project under ``--work`` (ingest of Financial PhraseBank and
Reuters-21578, untimed) with its own MLflow server, and runs ``finsent`` from a
copy of the sources taken at its start: an edit made meanwhile would be a code
change, which the cache rightly does not reuse. Appends one JSON object to
``bench/results/step_cache.jsonl`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SOURCES = ("pipeline", "serving", "recipes", "tests/behavioural")  # what `finsent train` reads of the repository


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's fine-tuning epochs")
    parser.add_argument("--work", type=Path, default=REPO / ".finsent" / "bench-step-cache")
    parser.add_argument("--fpb-dir", type=Path, default=REPO.parent / "shared/data/financial_phrasebank")
    parser.add_argument("--reuters-dir", type=Path, default=REPO.parent / "shared/data/reuters21578")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/step_cache.jsonl")
    return parser.parse_args()


def snapshot(dest: Path) -> Path:
    for name in SOURCES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def finsent(args: list[str], env: dict[str, str], log: Path) -> tuple[float, dict]:
    """Runs ``finsent ARGS`` from the snapshot; its wall time and the JSON object of its last line."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=env["PYTHONPATH"],
                              stdout=subprocess.PIPE, stderr=out, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"finsent {' '.join(args)} exited with {done.returncode}: see {log}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    from pipeline.services import start_mlflow_server, stop_process

    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "logs").mkdir(parents=True)
    sources = snapshot(args.work / "sources")
    server, uri = start_mlflow_server(args.work / "mlflow")
    env = {key: value for key, value in os.environ.items() if not key.startswith("FINSENT_")}
    env.update({"FINSENT_PROJECT_DIR": str(args.work / "project"), "FINSENT_STATE_DIR": str(args.work / "state"),
                "FINSENT_FPB_DIR": str(args.fpb_dir), "FINSENT_REUTERS_DIR": str(args.reuters_dir),
                "FINSENT_TRACKING_URI": uri, "FINSENT_EXPERIMENT": "bench-step-cache", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(sources)})
    if args.epochs is not None:
        env["FINSENT_TRAIN__EPOCHS"] = str(args.epochs)
    (args.work / "project").mkdir()
    train = ["train", "--recipe", args.recipe]
    load = [round(value, 2) for value in os.getloadavg()]
    logs = args.work / "logs"
    try:
        finsent(["ingest"], env, logs / "ingest.log")
        first_s, first = finsent(train, env, logs / "train-first.log")
        cached_s, cached = finsent(train, env, logs / "train-cached.log")
        forced_s, forced = finsent([*train, "--no-cache"], env, logs / "train-no-cache.log")
    finally:
        stop_process(server)
    assert cached.get("cached") and cached["version"] == first["version"], cached
    assert not forced.get("cached") and forced["version"] != first["version"], forced
    record = {
        "bench": "step_cache",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load,  # other work on the machine slows every run alike
        "recipe": args.recipe,
        "epochs_override": args.epochs,
        "first_s": round(first_s, 1),
        "cached_s": round(cached_s, 1),
        "no_cache_s": round(forced_s, 1),
        "first_over_cached": round(first_s / cached_s, 1),
        "versions": {"first": first["version"], "cached": cached["version"], "no_cache": forced["version"]},
        "test_macro_f1": {"first": first["test_metrics"].get("macro_f1"), "no_cache": forced["test_metrics"].get("macro_f1")},
        "command": " ".join(["python bench/step_cache.py", "--recipe", args.recipe,
                             *(["--epochs", str(args.epochs)] if args.epochs is not None else [])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()

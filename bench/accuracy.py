"""Test accuracy on the canonical Financial PhraseBank split, over seeds.

The canonical split of published results: 50Agree, deduplicated (conflicting
labels dropped), stratified 72/8/20 with seed 0. For each seed and each
variant ("base": fine-tune the base; "mlm": masked-LM adaptation on Reuters
plus the train sentences first, kept only if validation perplexity improves;
with a ``teacher_model`` and ``distill_corpus_texts`` the teacher labels Reuters
sentences)
the project's own ``adapt_mlm`` / ``finetune`` / ``predict_logits`` run with
the configured TrainConfig, and test accuracy, macro-F1 and AllAgree-slice
accuracy are recorded. Prints one line per run, the mean and spread per
variant, the scores of the seeds' models as an ensemble (their test
probabilities averaged: what distilling such an ensemble into one model could
at best reach), and as its last line one JSON object; appends that object to
``--out``.

    python bench/accuracy.py --seeds 3 --device cuda
    python bench/accuracy.py --seeds 1 --device cpu --variants base --set epochs=1   # a CPU smoke run
    python bench/accuracy.py --recipe fpb-minilm --seeds 3 --variants base   # a recipe of recipes/

Training settings come from TrainConfig: a recipe (``--recipe NAME|PATH``), then
FINSENT_TRAIN__* variables, then ``--set key=value``.

On a machine without the data folders, ``--export-inputs DIR`` (run where the
data is) writes the canonical split and the Reuters texts to DIR, and
``--inputs DIR`` reads them there. Seeds of one recipe can run as separate
processes (``--seed-list 1 --label NAME``); ``--combine FILE...`` then
summarises every result line of each label and variant across those files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLOORS = {"accuracy": 0.845, "macro_f1": 0.82}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--variants", default="base,mlm", help="comma-separated: base, mlm")
    parser.add_argument("--fpb-dir", type=Path, default=REPO.parent / "shared/data/financial_phrasebank")
    parser.add_argument("--reuters-dir", type=Path, default=REPO.parent / "shared/data/reuters21578")
    parser.add_argument("--recipe", help="a recipe of recipes/ (name) or a YAML file; its label if --label is unset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig field")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/accuracy.jsonl")
    parser.add_argument("--seed-list", help="comma-separated seeds; overrides --seeds")
    parser.add_argument("--limit-rows", type=int, help="first N rows of each split only (smoke tests; not a result)")
    parser.add_argument("--label", default="", help="a name for this recipe in the results")
    parser.add_argument("--inputs", type=Path, help="a folder written by --export-inputs, instead of the data folders")
    parser.add_argument("--export-inputs", type=Path, metavar="DIR", help="write the split and corpus to DIR and exit")
    parser.add_argument("--save-model", type=Path, metavar="DIR",
                        help="keep each run's fine-tuned model in DIR/<variant>-seed<N> (e.g. as a distillation teacher)")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSONL", help="summarise result lines and exit")
    return parser.parse_args(argv)


SPLITS = ("train", "validation", "test")
CORPUS_FILE = "reuters_texts.json.gz"


def export_inputs(args: argparse.Namespace, out: Path) -> None:
    import gzip

    from pipeline.data.sources import read_reuters

    out.mkdir(parents=True, exist_ok=True)
    for name, frame in canonical_split(args.fpb_dir).items():
        frame.to_parquet(out / f"{name}.parquet", index=False)
    with gzip.open(out / CORPUS_FILE, "wt", encoding="utf-8") as handle:
        json.dump(read_reuters(args.reuters_dir)["text"].tolist(), handle)
    print("inputs written to", out)


def load_inputs(folder: Path) -> tuple[dict, list[str]]:
    import gzip

    import pandas as pd

    splits = {name: pd.read_parquet(folder / f"{name}.parquet") for name in SPLITS}
    with gzip.open(folder / CORPUS_FILE, "rt", encoding="utf-8") as handle:
        return splits, json.load(handle)


def combine(files: list[Path]) -> dict:
    """One summary per (label, variant) over the runs of every result line in ``files``."""
    results = [json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()]
    combined = {}
    for label in sorted({r.get("label", "") for r in results}):
        runs = [run for r in results if r.get("label", "") == label for run in r["runs"]]
        combined[label] = summarise(runs)
        combined[label]["seeds"] = sorted({run["seed"] for run in runs})
    print(json.dumps(combined))
    return combined


def canonical_split(fpb_dir: Path) -> dict:
    from pipeline.config import IngestConfig
    from pipeline.data.clean import clean_labeled
    from pipeline.data.sources import read_phrasebank
    from pipeline.data.split import split_labeled

    raw, agreement = read_phrasebank(fpb_dir)
    cfg = IngestConfig(split_method="stratified", seed=0)
    return split_labeled(clean_labeled(raw, agreement, cfg).clean, cfg)


def train_config(overrides: list[str], recipe: str | None = None):
    from pipeline.config import Settings

    cfg = Settings(recipe=recipe).train
    updates = {}
    for item in overrides:
        key, _, value = item.partition("=")
        updates[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    return cfg.model_validate({**cfg.model_dump(), **updates})


def run_once(splits: dict, corpus: list[str], cfg, variant: str, seed: int, work: Path,
             save_to: Path | None = None) -> tuple[dict, "np.ndarray"]:
    from pipeline.bases import resolve_base_model
    from pipeline.train.classify import finetune
    from pipeline.train.model import load_classifier, predict_logits
    from pipeline.train.evaluate import classification_metrics, label_ids, softmax
    from pipeline.train.mlm import adapt_mlm

    cfg = cfg.model_copy(update={"seed": seed})
    started = time.perf_counter()
    model_dir, mlm = resolve_base_model(cfg.base_model), None
    if variant == "mlm":
        result = adapt_mlm(model_dir, corpus[: cfg.mlm_max_corpus_texts] + splits["train"]["text"].tolist(),
                           splits["validation"]["text"].tolist(), work / "mlm", cfg)
        model_dir, mlm = result.model_dir, {"used": result.used, "perplexity_base": result.perplexity_base,
                                            "perplexity_adapted": result.perplexity_adapted,
                                            "perplexity_random_head": result.perplexity_random_head,
                                            "head_fit_steps": result.head_fit_steps}
    tuned = finetune(model_dir, splits["train"], splits["validation"], work / "finetune", cfg, corpus=corpus)
    model, tokenizer = load_classifier(tuned["model_dir"])
    test = splits["test"]
    probs = softmax(predict_logits(model, tokenizer, test["text"].tolist(), cfg.max_length))
    metrics = classification_metrics(label_ids(test["label"]), probs, test["agreement"].to_numpy())
    if save_to is not None:
        shutil.copytree(tuned["model_dir"], save_to, dirs_exist_ok=True)
    return {
        "variant": variant, "seed": seed, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "accuracy_allagree": metrics["accuracy_allagree"], "best_epoch": tuned["best_epoch"], "mlm": mlm,
        "val_macro_f1": tuned["best_val_macro_f1"], "distillation": tuned.get("distillation"),
        "model_class": type(model).__name__,  # the head actually trained: a base may keep its own
        "seconds": round(time.perf_counter() - started, 1),
    }, probs


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for variant in sorted({r["variant"] for r in runs}):
        chosen = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            key: {"mean": round(statistics.mean(r[key] for r in chosen), 4),
                  "std": round(statistics.stdev(r[key] for r in chosen), 4) if len(chosen) > 1 else 0.0}
            for key in ("accuracy", "macro_f1", "accuracy_allagree")
        }
        summary[variant]["meets_floors"] = all(summary[variant][k]["mean"] >= v for k, v in FLOORS.items())
    return summary


def seed_ensemble(runs: list[dict], test_probs: list, test) -> dict:
    """Per variant with several seeds: the test scores of the mean of the seeds' probabilities."""
    import numpy as np

    from pipeline.train.evaluate import classification_metrics, label_ids

    scores = {}
    for variant in sorted({r["variant"] for r in runs}):
        chosen = [probs for run, probs in zip(runs, test_probs) if run["variant"] == variant]
        if len(chosen) > 1:
            metrics = classification_metrics(label_ids(test["label"]), np.mean(chosen, axis=0), test["agreement"].to_numpy())
            scores[variant] = {key: round(metrics[key], 4) for key in ("accuracy", "macro_f1", "accuracy_allagree")}
    return scores


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import pandas as pd

    if args.combine:
        return combine(args.combine)
    if args.export_inputs:
        export_inputs(args, args.export_inputs)
        return {}
    cfg = train_config(args.set, args.recipe)
    if args.recipe and not args.label:
        args.label = Path(args.recipe).stem
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.inputs:
        splits, corpus = load_inputs(args.inputs)
    else:
        from pipeline.data.sources import read_reuters

        splits, corpus = canonical_split(args.fpb_dir), []
        if "mlm" in variants or cfg.distill_corpus_texts > 0:
            corpus = read_reuters(args.reuters_dir)["text"].tolist()
    if args.limit_rows:
        splits = {name: frame.head(args.limit_rows) for name, frame in splits.items()}
    print("canonical split:", {name: len(frame) for name, frame in splits.items()}, flush=True)
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    runs, test_probs = [], []
    for variant in variants:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as work:
                saved = args.save_model / f"{variant}-seed{seed}" if args.save_model else None
                run, probs = run_once(splits, corpus, cfg, variant, seed, Path(work), saved)
            runs.append(run)
            test_probs.append(probs)
            print("run:", json.dumps(run), flush=True)
    import torch

    result = {
        "benchmark": "accuracy", "label": args.label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "command": " ".join(["python", "bench/accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "recipe": args.recipe, "config": cfg.model_dump(), "floors": FLOORS, "summary": summarise(runs),
        "seed_ensemble": seed_ensemble(runs, test_probs, splits["test"]), "runs": runs,
    }
    print(pd.DataFrame(runs).drop(columns=["mlm"]).to_string(index=False), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

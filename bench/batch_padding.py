"""How a batch of texts is best run on CPU: as one padded run, one text at a
time, or in length order in groups that pad little (``OnnxClassifier.run_sorted``).

Two inputs, the demo's served variant: requests of 16 random Financial
PhraseBank sentences (what the server's batcher hands the model under 16
clients), and 1,500 Reuters sentences in bulk (the monitor). Appends one JSON
object to ``bench/results/batch_padding.jsonl``.

    .venv/bin/python bench/batch_padding.py        (after `make demo`)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rate(run, batches: list[list[list[int]]]) -> float:
    run(batches[0])
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    return round(sum(map(len, batches)) / (time.perf_counter() - started), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=REPO / ".finsent", help="the demo's state folder")
    parser.add_argument("--fpb-dir", type=Path, default=REPO.parent / "shared/data/financial_phrasebank")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/batch_padding.jsonl")
    args = parser.parse_args()

    import pandas as pd

    from pipeline import services
    from pipeline.config import Settings
    from pipeline.data.sources import read_phrasebank, split_sentences
    from serving.model import OnnxClassifier
    from serving.registry import load_version, resolve_alias

    mlflow_process, tracking_uri = services.start_mlflow_server(args.state.resolve())
    try:
        settings = Settings(tracking_uri=tracking_uri)
        version = resolve_alias(tracking_uri, settings.model_name, "champion")
        model = load_version(tracking_uri, version, args.state / "bench-batch-padding")
    finally:
        services.stop_process(mlflow_process)

    raw, _ = read_phrasebank(args.fpb_dir)
    sentences = raw["text"].drop_duplicates().tolist()
    random.Random(0).shuffle(sentences)
    fpb = model.encode(sentences[:1600])
    requests = [fpb[i : i + 16] for i in range(0, len(fpb), 16)]
    corpus = pd.read_parquet(REPO / "data/curated/corpus/reuters.parquet", columns=["text"])["text"].head(2000)
    reuters = model.encode([s for text in corpus for s in split_sentences(text)][:1500])

    def padded(batch):
        return model.run_encoded(batch)

    def one_by_one(batch):
        return np.concatenate([model.run_encoded([ids]) for ids in batch])

    def fixed_sorted(batch, size):
        order = np.argsort([len(ids) for ids in batch], kind="stable")
        return [model.run_encoded([batch[i] for i in order[s : s + size]]) for s in range(0, len(batch), size)]

    record = {"bench": "batch_padding", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": platform.node(), "cpus": os.cpu_count(), "command": "python bench/batch_padding.py",
              "model_version": version.version, "variant": model.variant, "fpb_requests_of_16": {}, "reuters_bulk": {}}
    default = model.batch_size
    for size in (8, 16):
        model.batch_size = size
        record["fpb_requests_of_16"].update({
            "one padded run": rate(padded, requests), "one text a run": rate(one_by_one, requests),
            f"sorted, groups of {size} padding <= 10 %": rate(model.run_sorted, requests)})
    for size in (8, 16, 64):
        model.batch_size = size
        record["reuters_bulk"].update({
            f"sorted, fixed batches of {size}": rate(lambda b: fixed_sorted(b, size), [reuters]),
            f"sorted, groups of {size} padding <= 10 %": rate(model.run_sorted, [reuters])})
    model.batch_size = default
    line = json.dumps(record)
    print(line)
    with open(args.out, "a") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()

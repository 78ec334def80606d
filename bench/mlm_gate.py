"""What does the masked-LM gate compare, for a base that ships without a masked-LM head?

Runs the project's ``adapt_mlm`` on the corpus the train DAG uses (the first
``mlm_max_corpus_texts`` Reuters bodies plus the canonical split's train sentences) and
validation sentences, once for each number of head-only steps: the base's new head is trained
alone that long before the base's perplexity is measured (``TrainConfig.mlm_head_steps``; 0 is
the random head; at ``--head-lr``, default ``pipeline.train.mlm.HEAD_LEARNING_RATE``), then the
whole model trains ``--steps`` steps. Prints one JSON line per run
(random-head, base and adapted perplexity, the gate's verdict) and, last, one JSON object with
all of them, also appended to ``bench/results/mlm_gate.jsonl``.

    python bench/mlm_gate.py --head-steps 0,40,200 --steps 40
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-steps", default="0,40,200", help="comma-separated; 0: the random head")
    parser.add_argument("--head-lr", type=float, help="default: pipeline.train.mlm.HEAD_LEARNING_RATE")
    parser.add_argument("--steps", type=int, default=40, help="masked-LM steps of the whole model")
    parser.add_argument("--base", help="base model folder or hub id; default: the offline MiniLM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpb-dir", type=Path, default=REPO.parent / "shared/data/financial_phrasebank")
    parser.add_argument("--reuters-dir", type=Path, default=REPO.parent / "shared/data/reuters21578")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/mlm_gate.jsonl")
    args = parser.parse_args()

    import torch

    from bench.accuracy import canonical_split
    from pipeline.config import OFFLINE_MINILM, TrainConfig
    from pipeline.data.sources import read_reuters
    from pipeline.train import mlm
    from pipeline.bases import resolve_base_model
    from pipeline.train.mlm import adapt_mlm

    splits = canonical_split(args.fpb_dir)
    base = resolve_base_model(args.base or OFFLINE_MINILM)
    cfg = TrainConfig(base_model=base, mlm_steps=args.steps, seed=args.seed, checkpoint_steps=0)
    if args.head_lr is not None:
        mlm.HEAD_LEARNING_RATE = args.head_lr  # read by fit_new_head at each call
    corpus = read_reuters(args.reuters_dir)["text"].head(cfg.mlm_max_corpus_texts).tolist()
    corpus += splits["train"]["text"].tolist()
    validation = splits["validation"]["text"].tolist()
    runs = []
    for head_steps in (int(s) for s in args.head_steps.split(",")):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            result = adapt_mlm(base, corpus, validation, Path(work), cfg.model_copy(update={"mlm_head_steps": head_steps}))
        run = {
            "head_steps": result.head_fit_steps, "steps": result.steps, "blocks": result.blocks,
            "perplexity_random_head": result.perplexity_random_head, "perplexity_base": result.perplexity_base,
            "perplexity_adapted": result.perplexity_adapted, "used": result.used, "reason": result.reason,
            "wall_s": round(time.perf_counter() - started, 1),
        }
        runs.append(run)
        print("run:", json.dumps(run), flush=True)
    summary = {
        "bench": "mlm_gate", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": args.base or OFFLINE_MINILM, "steps": args.steps, "seed": args.seed,
        "head_learning_rate": mlm.HEAD_LEARNING_RATE, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(summary) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

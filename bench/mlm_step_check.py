"""Does masked-LM adaptation through the masked-positions step adapt as well as Hugging Face's?

Runs the project's ``adapt_mlm`` twice on the canonical split's train sentences, from the same
base, seed, steps and blocks: once as it runs now (static k predictions per block, the head on
those rows only) and once with Hugging Face's collator and the head on every position (what it
ran before). Both adapted models' validation perplexity is measured the same way (token masks at
a fixed seed, full head). Prints one JSON line per run.

    python bench/mlm_step_check.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--base", help="base model folder or hub id; default: the offline MiniLM")
    args = parser.parse_args()

    from bench.accuracy import canonical_split
    from pipeline.config import OFFLINE_MINILM, TrainConfig
    from pipeline.train import mlm
    from pipeline.train.base import resolve_base_model

    splits = canonical_split(REPO.parent / "shared" / "data" / "financial_phrasebank")
    train, validation = splits["train"]["text"].tolist(), splits["validation"]["text"].tolist()
    base = resolve_base_model(args.base or OFFLINE_MINILM)
    cfg = TrainConfig(base_model=base, mlm_steps=args.steps, mlm_batch_size=args.batch, checkpoint_steps=0,
                      mlm_margin=-1.0, mlm_max_corpus_texts=len(train), seed=0)
    packed_collator = mlm._packed_collator
    for step, collator in (("masked_positions", packed_collator), ("hugging_face", lambda *a, **k: None)):
        mlm._packed_collator = collator  # None: adapt_mlm's fallback, Hugging Face's collator and full head
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            result = mlm.adapt_mlm(base, train, validation, Path(work), cfg)
        print(json.dumps({
            "step": step, "steps": result.steps, "blocks": result.blocks, "perplexity_base": round(result.perplexity_base, 2),
            "perplexity_adapted": round(result.perplexity_adapted, 2), "wall_s": round(time.perf_counter() - started, 1),
        }), flush=True)
    mlm._packed_collator = packed_collator


if __name__ == "__main__":
    main()

"""Does masked-LM adaptation adapt as well with a faster step as without it?

Runs the project's ``adapt_mlm`` twice on the canonical split's train sentences, from the same
base, seed, steps and blocks, and measures both adapted models' validation perplexity the same
way (token masks at a fixed seed, full head). ``--compare`` picks the two runs:

* ``step``: the masked-positions step as it runs now (static k predictions per block, the head on
  those rows only) against Hugging Face's collator and the head on every position (what it ran
  before);
* ``bf16-residual``: under bf16 autocast (on a CPU too), the residual stream between layers in
  float32 (autocast's own) against bf16 (``bench/mlm_levers.py``, ``:bf16res``). With ``--seeds 0,1``
  the spread between seeds shows how large a difference the rounding would have to make to matter;
* ``dropout``: the model's own dropout (BERT's 0.1) against none while training (``:nodrop``),
  in float32;
* ``fast-recipe``: under bf16 autocast, both recipe changes of the fastest step together (the
  residual stream in bf16 and no dropout) against neither.

The recipe levers are not TrainConfig fields: a BERT base is built as a ``LeverBertForMaskedLM``
subclass with them set (``bench.mlm_levers.packed_bert_class``); they apply once the whole model
trains, after a new head's fit alone.

Prints one JSON line per run.

    python bench/mlm_step_check.py --steps 100
    python bench/mlm_step_check.py --compare bf16-residual --steps 60 --seeds 0,1
    python bench/mlm_step_check.py --compare dropout --steps 60 --seeds 0,1
    python bench/mlm_step_check.py --compare fast-recipe --steps 60 --seeds 0,1
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
    parser.add_argument("--compare", choices=["step", "bf16-residual", "dropout", "fast-recipe"], default="step")
    parser.add_argument("--seeds", default="0", help="comma-separated; both runs for each")
    args = parser.parse_args()

    from transformers import AutoConfig

    from bench.accuracy import canonical_split
    from bench.mlm_levers import lever_class, packed_bert_class
    from pipeline.config import OFFLINE_MINILM, TrainConfig
    from pipeline.train import mlm
    from pipeline.bases import resolve_base_model
    from pipeline.train.fast_mlm import PackedBertForMaskedLM

    splits = canonical_split(REPO.parent / "shared" / "data" / "financial_phrasebank")
    train, validation = splits["train"]["text"].tolist(), splits["validation"]["text"].tolist()
    base = resolve_base_model(args.base or OFFLINE_MINILM)
    if args.compare != "step" and AutoConfig.from_pretrained(base).model_type != "bert":
        raise SystemExit(f"--compare {args.compare}: the recipe levers are written for BERT bases")
    cfg = TrainConfig(base_model=base, mlm_steps=args.steps, mlm_batch_size=args.batch, checkpoint_steps=0,
                      mlm_margin=-1.0, mlm_max_corpus_texts=len(train))
    packed_collator = mlm._packed_collator
    # (name, TrainConfig overrides, collator, the class a BERT base is built as)
    own = PackedBertForMaskedLM
    if args.compare == "step":
        runs = [("masked_positions", {}, packed_collator, own),
                ("hugging_face", {}, lambda *a, **k: None, own)]  # None: adapt_mlm's fallback, Hugging Face's collator
    elif args.compare == "bf16-residual":
        runs = [("float32_stream", {"bf16": True}, packed_collator, own),
                ("bf16_stream", {"bf16": True}, packed_collator, lever_class(bf16_residual=True))]
    elif args.compare == "dropout":
        runs = [("own_dropout", {}, packed_collator, own),
                ("no_dropout", {}, packed_collator, lever_class(dropout=0.0))]
    else:
        runs = [("float32_stream_own_dropout", {"bf16": True}, packed_collator, own),
                ("bf16_stream_no_dropout", {"bf16": True}, packed_collator,
                 lever_class(bf16_residual=True, dropout=0.0))]
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, overrides, collator, bert_class in runs:
            mlm._packed_collator = collator
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as work, packed_bert_class(bert_class):
                run_cfg = cfg.model_copy(update={"seed": seed, **overrides})
                result = mlm.adapt_mlm(base, train, validation, Path(work), run_cfg)
            print(json.dumps({
                "run": name, "seed": seed, "steps": result.steps, "blocks": result.blocks,
                "perplexity_base": round(result.perplexity_base, 2),
                "perplexity_adapted": round(result.perplexity_adapted, 2),
                "wall_s": round(time.perf_counter() - started, 1),
            }), flush=True)
    mlm._packed_collator = packed_collator


if __name__ == "__main__":
    main()

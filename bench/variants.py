"""Release variants on a fine-tuned classifier (the demo's champion by default):
each variant's blessing figures against PyTorch on the frozen test split
(label flips, macro-F1 delta, max |logit diff|) and its CPU throughput, next
to PyTorch's own in the same run; int8 on every MatMul and on the attention
projections only (the release keeps the first within budget), and int8 with
per-tensor weights, which the per-channel default was measured against.

    .venv/bin/python bench/variants.py --hf-dir <transformers folder>

Without ``--hf-dir`` it exports the demo's champion from ``.finsent`` (start
`make demo` first). Appends one JSON object to ``bench/results/variants.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", type=Path, default=None, help="transformers folder (default: the demo's champion)")
    parser.add_argument("--labeled-dir", type=Path, default=REPO / "data/curated/labeled")
    parser.add_argument("--work", type=Path, default=REPO / ".finsent" / "bench-variants")
    parser.add_argument("--speed-texts", type=int, default=400)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/variants.jsonl")
    return parser.parse_args()


def champion_hf_dir(work: Path) -> Path:
    from pipeline import registry
    from pipeline.config import Settings
    from pipeline.services import start_mlflow_server, stop_process

    settings = Settings()
    process, uri = start_mlflow_server(settings.state_dir)
    try:
        champion = registry.version_by_alias(settings.model_copy(update={"tracking_uri": uri}), registry.CHAMPION)
        if champion is None:
            raise SystemExit("no champion in .finsent: run `make demo` first, or give --hf-dir")
        return registry.download_hf_model(champion, work / "registered")
    finally:
        stop_process(process)


def seq_per_s(score, texts: list[str]) -> float:
    score(texts[:16])
    start = time.perf_counter()
    score(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    import numpy as np
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.config import ReleaseConfig
    from pipeline.data.ingest import load_split
    from pipeline.export.onnx import export_onnx
    from pipeline.export.variants import INT8_SCOPES, bless, build_and_bless, quantize_int8
    from pipeline.train.evaluate import label_ids
    from pipeline.train.model import load_classifier, predict_logits

    args.work.mkdir(parents=True, exist_ok=True)
    hf_dir = args.hf_dir or champion_hf_dir(args.work)
    test = load_split(args.labeled_dir, "test")
    texts, y = test["text"].tolist(), label_ids(test["label"])
    model, tokenizer = load_classifier(str(hf_dir))
    reference = predict_logits(model, tokenizer, texts, 128)
    sample = texts[: args.speed_texts]
    pytorch_batched = seq_per_s(lambda t: predict_logits(model, tokenizer, t, 128, batch_size=4), sample)
    pytorch_single = seq_per_s(lambda t: [predict_logits(model, tokenizer, [x], 128, batch_size=1) for x in t], sample[:150])
    fp32 = export_onnx(hf_dir, args.work / "fp32", 128)
    budgets = ReleaseConfig().budgets
    tuning = load_split(args.labeled_dir, "validation")["text"].tolist()
    folders, blessings = build_and_bless(hf_dir, fp32, args.work, reference, texts, y, budgets, tuning)
    source = folders.get("fp32-optimized", fp32)
    # Every int8 scope, whichever the release kept, and the per-tensor weights the per-channel default beat.
    candidates = {name: folder for name, folder in folders.items() if name != "int8"}
    for scope in INT8_SCOPES:
        candidates[f"int8-{scope}"] = quantize_int8(source, args.work / f"int8-{scope}", scope, tuning)
    per_tensor = args.work / "int8-all-per-tensor"
    per_tensor.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "serving.json"):
        (per_tensor / name).write_bytes((candidates["int8-all"] / name).read_bytes())
    quantize_dynamic(str(source / "model.onnx"), str(per_tensor / "model.onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    manifest = json.loads((per_tensor / "serving.json").read_text())
    manifest.pop("sha256")
    (per_tensor / "serving.json").write_text(json.dumps(manifest))
    candidates["int8-all-per-tensor"] = per_tensor
    rows = {}
    for name, folder in candidates.items():
        blessing = bless(name, folder, reference, texts, y, budgets[name if name in budgets else "int8"])
        rows[name] = {key: getattr(blessing, key) for key in
                      ("blessed", "label_flips", "flip_rate", "macro_f1_delta_pt", "max_abs_diff", "cpu_seq_per_s", "reasons")}
        rows[name]["vs_pytorch_batch4"] = round(blessing.cpu_seq_per_s / pytorch_batched, 2)
        rows[name]["mb"] = round((folder / "model.onnx").stat().st_size / 1e6, 1)
    record = {
        "bench": "variants", "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "hf_dir": str(hf_dir), "test_sentences": len(texts),
        "speed_texts": len(sample), "pytorch_seq_per_s_batch4": round(pytorch_batched, 1),
        "pytorch_seq_per_s_one_by_one": round(pytorch_single, 1), "variants": rows,
        "release_kept": {name: b.summary() for name, b in blessings.items()},
        # Sentences a logit error of 0.5 (int8's typical max) could flip: their top-two logits are that close.
        "test_sentences_within_0.5_logit_margin": int((np.diff(np.sort(reference, axis=1)[:, -2:], axis=1) < 0.5).sum()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

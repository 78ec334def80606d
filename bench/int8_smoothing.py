"""int8 on every MatMul, made accurate enough: the feed-forward MatMuls'
activation outliers are moved into their weights per input channel
(SmoothQuant's s = max|x|^a / max|w|^(1-a), a Mul by 1/s inserted before the
MatMul), then dynamic int8 with per-channel weights; optionally the one
feed-forward MatMul whose fp32 copy lowers the mean logit error most on the
validation split (no labels used) is kept in fp32. Label flips and logit error
against the fp32-optimized export on the frozen test split, speed on Reuters
sentences at the CPU batch, next to the served int8 variant in the same run.

    python bench/int8_smoothing.py [--alphas 0.8,0.9]      (after `make demo`)"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=Path, default=None,
                        help="the champion's onnx/v<N> folder (default: the demo's version 1 in .finsent/mlflow)")
    parser.add_argument("--alphas", default="0.8,0.9")
    parser.add_argument("--calibration", type=int, default=512, help="train and corpus sentences for the maxima")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/int8_smoothing.jsonl")
    return parser.parse_args()


def smoothed(source: Path, matmuls: set[str], maxima: dict, alpha: float, out: Path) -> Path:
    import onnx

    from pipeline.export.smoothing import smooth

    model = onnx.load(str(source / "model.onnx"))
    del model.graph.value_info[:]
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(smooth(model, matmuls, maxima, alpha), str(out / "model.onnx"))
    return out / "model.onnx"


def quantized(unquantized: Path, source: Path, excluded: list[str], out: Path) -> Path:
    from pipeline.export.variants import INT8, _copy_side_files, _quantize

    out.mkdir(parents=True, exist_ok=True)
    _quantize(unquantized, out / "model.onnx", excluded)
    return _copy_side_files(source, out, "model.onnx", INT8)


def main() -> None:
    args = parse_args()
    import onnx

    from pipeline.data.sources import read_reuters, split_sentences
    from pipeline.export.smoothing import activation_maxima
    from pipeline.export.variants import _feed_forward_matmuls
    from serving.model import OnnxClassifier

    variants = args.variants or next((REPO / ".finsent/mlflow/artifacts").glob("*/*/artifacts/onnx/v1"))
    source, work = variants / "fp32-optimized", REPO / ".finsent" / "bench-int8-smoothing"
    work.mkdir(parents=True, exist_ok=True)
    labeled = REPO / "data/curated/labeled"
    test = pd.read_parquet(labeled / "test.parquet")["text"].tolist()
    validation = pd.read_parquet(labeled / "validation.parquet")["text"].tolist()
    train = pd.read_parquet(labeled / "train.parquet")["text"].tolist()
    stories = read_reuters(REPO.parent / "shared/data/reuters21578").drop_duplicates("text").sample(300, random_state=0)
    reuters = list(dict.fromkeys(s for text in stories["text"] for s in split_sentences(text)))[:1500]
    half = args.calibration // 2
    calibration = train[:half] + reuters[-half:]

    reference = OnnxClassifier(source, batch_size=8)
    test_reference, validation_reference = reference.logits(test), reference.logits(validation)

    def measure(folder: Path) -> dict:
        model = OnnxClassifier(folder)
        logits = model.logits(test)
        flips = int((logits.argmax(1) != test_reference.argmax(1)).sum())
        model.logits(reuters[:50])
        started = time.perf_counter()
        model.logits(reuters)
        return {"flips": flips, "flip_rate": round(flips / len(test), 4),
                "max_abs_logit_diff": round(float(np.abs(logits - test_reference).max()), 4),
                "texts_per_s": round(len(reuters) / (time.perf_counter() - started), 1)}

    graph = onnx.load(str(source / "model.onnx"))
    matmuls = set(_feed_forward_matmuls(graph))
    activations = {node.input[0] for node in graph.graph.node if node.name in matmuls}
    maxima = activation_maxima(source / "model.onnx", reference, calibration, sorted(activations), work)
    record: dict = {"bench": "int8_smoothing", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "host": platform.node(), "command": f"python bench/int8_smoothing.py --alphas {args.alphas}",
                    "test_sentences": len(test), "calibration_sentences": len(calibration),
                    "served_int8": measure(variants / "int8")}
    ones = {name: np.ones_like(found) for name, found in maxima.items()}  # s = 1: the Mul nodes, no smoothing
    record["int8_all_unsmoothed"] = measure(quantized(smoothed(source, matmuls, ones, 1.0, work / "fp32-plain"),
                                                      source, [], work / "int8-all"))
    for alpha in (float(a) for a in args.alphas.split(",")):
        unquantized = smoothed(source, matmuls, maxima, alpha, work / f"fp32-smoothed-{alpha}")
        figures = {"all": measure(quantized(unquantized, source, [], work / f"int8-smoothed-{alpha}"))}
        # The one MatMul kept fp32: chosen by mean logit error on the validation split, no labels.
        errors = {}
        for name in sorted(matmuls):
            folder = quantized(unquantized, source, [name], work / "int8-probe")
            errors[name] = float(np.abs(OnnxClassifier(folder).logits(validation) - validation_reference).mean())
        kept = min(errors, key=errors.get)
        figures["one_fp32"] = {"kept_fp32": kept, "validation_mean_abs_logit_diff": round(errors[kept], 4),
                               **measure(quantized(unquantized, source, [kept], work / f"int8-smoothed-{alpha}-one"))}
        record[f"alpha_{alpha}"] = figures
        print(alpha, json.dumps(figures), flush=True)
    line = json.dumps(record)
    print(line)
    with open(args.out, "a") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()

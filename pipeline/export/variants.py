"""The served variants of an exported classifier and their blessing.

``fp32`` is the plain export. ``fp32-optimized`` is the same network through
ONNX Runtime's transformer optimizer (fused attention, LayerNorm and GELU).
``int8`` is its dynamic quantization and ``fp16`` its half-precision copy for GPU
nodes. A variant is *blessed* only when it stays within its own budget against
PyTorch on the frozen test split; an unblessed variant is never uploaded."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import VariantBudget
from serving.model import MANIFEST, OnnxClassifier, manifest_checksums

log = logging.getLogger(__name__)

FP32, OPTIMIZED, INT8, FP16 = "fp32", "fp32-optimized", "int8", "fp16"
# fp16 is for GPU nodes: on the CPU provider it runs (ONNX Runtime casts around the kernels it lacks)
# but slower than fp32, so it is never the CPU default, and it stays unverified-on-GPU until a GPU runs it.
CPU_VARIANTS = (FP32, OPTIMIZED, INT8)
SPEED_TEXTS = 256
# int8 is tried on every MatMul first; then with the feed-forward inputs smoothed into their weights and
# the one feed-forward MatMul the tuning texts pick kept fp32; then with the feed-forward projections left
# in fp32. On the demo's MiniLM champion (942 test sentences, 1,500 Reuters sentences for speed): every
# MatMul 17 flips at 667 texts/s, smoothed 7 flips at 597, attention only 6 flips at 366 (bench/RESULTS.md,
# "Release variants"). The first scope within budget is kept.
INT8_SCOPES = {"all": "every MatMul",
               "smoothed": "every MatMul, feed-forward inputs smoothed, one feed-forward MatMul fp32",
               "attention": "attention projections; feed-forward kept fp32"}


@dataclass
class Blessing:
    variant: str
    blessed: bool
    n: int
    max_abs_diff: float
    label_flips: int
    flip_rate: float
    macro_f1_delta_pt: float
    cpu_seq_per_s: float
    reasons: list[str] = field(default_factory=list)
    verified_on: str = "CPUExecutionProvider"
    scope: str = ""
    earlier_attempts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "blessed" if self.blessed else "not blessed: " + "; ".join(self.reasons)
        if self.scope:
            verdict += f" (int8: {INT8_SCOPES[self.scope]})"
        return (f"{verdict} | flips {self.label_flips}/{self.n} ({100 * self.flip_rate:.2f} %), "
                f"macro-F1 {self.macro_f1_delta_pt:+.2f} pt, max|dlogit| {self.max_abs_diff:.1e}, "
                f"{self.cpu_seq_per_s:.0f} seq/s on CPU")


def _copy_side_files(source: Path, dest: Path, onnx_file: str, variant: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "tokenizer.json", dest / "tokenizer.json")
    manifest = json.loads((source / MANIFEST).read_text())
    manifest.update(onnx_file=onnx_file, variant=variant)
    manifest["sha256"] = manifest_checksums(dest, onnx_file)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dest


def export_optimized(hf_dir: Path, fp32_dir: Path, out_dir: Path) -> Path:
    """Exports through the TorchScript exporter with eager attention (the graph
    ONNX Runtime's fusion patterns match; the dynamo export fuses no attention),
    then runs the transformer optimizer on it."""
    import torch
    from onnxruntime.transformers import optimizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pipeline.train.pooling  # noqa: F401  (registers the mean-pooling head with the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, attn_implementation="eager").eval()
    example = tokenizer(["Profit rose.", "Net sales fell by 5 % in the quarter ."], padding=True, return_tensors="pt")
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example]
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "unoptimized.onnx"
    torch.onnx.export(
        model, tuple(example[name] for name in names), str(raw), input_names=names, output_names=["logits"],
        dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names}, opset_version=17, dynamo=False,
    )
    config = model.config
    optimized = optimizer.optimize_model(
        str(raw), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size,
    )
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    log.info("fp32-optimized: fused %s", fused)
    optimized.save_model_to_file(str(out_dir / "model.onnx"))
    raw.unlink()
    return _copy_side_files(fp32_dir, out_dir, "model.onnx", OPTIMIZED)


def _feed_forward_matmuls(model) -> list[str]:
    """MatMul nodes whose constant weight spans the widest dimension of the graph's
    MatMul weights: a transformer's feed-forward projections (hidden <-> intermediate)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer if len(init.dims) == 2}
    weights = {node.name: shapes[i] for node in model.graph.node if node.op_type == "MatMul"
               for i in node.input if i in shapes}
    widest = max((max(shape) for shape in weights.values()), default=0)
    return [name for name, shape in weights.items() if widest in shape and shape[0] != shape[1]]


def _quantize(source: Path, target: Path, excluded: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Shape inference cannot type the outputs of the optimizer's fused (com.microsoft) nodes; they are float.
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_exclude=excluded, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _smoothed_int8(model, source_dir: Path, out_dir: Path, tuning_texts: list[str]) -> None:
    """Every MatMul int8, the feed-forward inputs smoothed; the one feed-forward MatMul whose fp32
    copy lowers the mean logit error on ``tuning_texts`` most stays fp32 (no labels are used)."""
    import onnx

    from pipeline.export.smoothing import activation_maxima, smooth

    feed_forward = _feed_forward_matmuls(model)
    reference = OnnxClassifier(source_dir)
    activations = sorted({n.input[0] for n in model.graph.node if n.name in feed_forward})
    maxima = activation_maxima(source_dir / "model.onnx", reference, tuning_texts, activations, out_dir / "work")
    unquantized = out_dir / "work" / "smoothed.onnx"
    onnx.save(smooth(model, set(feed_forward), maxima), str(unquantized))
    target = reference.logits(tuning_texts)
    probe = out_dir / "work" / "probe"
    probe.mkdir()
    errors = {}
    for name in feed_forward:
        _quantize(unquantized, probe / "model.onnx", [name])
        _copy_side_files(source_dir, probe, "model.onnx", INT8)
        errors[name] = float(np.abs(OnnxClassifier(probe).logits(tuning_texts) - target).mean())
    kept = min(errors, key=errors.get)
    log.info("smoothed int8: %s kept fp32 (mean |dlogit| %.4f on %d tuning texts)", kept, errors[kept],
             len(tuning_texts))
    _quantize(unquantized, out_dir / "model.onnx", [kept])
    shutil.rmtree(out_dir / "work")


def quantize_int8(source_dir: Path, out_dir: Path, scope: str = "all", tuning_texts: list[str] | None = None) -> Path:
    """Dynamic quantization with per-channel weights: on the demo's MiniLM champion 19 label flips in 942
    test sentences against 32 per-tensor, at the same speed (bench/RESULTS.md, "Release variants").
    ``smoothed`` needs ``tuning_texts`` (sentences of the validation split)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    # The dynamo export's value_info holds shapes the quantizer's shape inference contradicts: drop them.
    model = onnx.load(str(source_dir / "model.onnx"))
    del model.graph.value_info[:]
    if scope == "smoothed":
        if not tuning_texts:
            raise ValueError("the smoothed int8 scope needs tuning texts")
        _smoothed_int8(model, source_dir, out_dir, tuning_texts)
    else:
        excluded = _feed_forward_matmuls(model) if scope == "attention" else []
        source = out_dir / "unquantized.onnx"
        onnx.save(model, str(source))
        _quantize(source, out_dir / "model.onnx", excluded)
        source.unlink()
    return _copy_side_files(source_dir, out_dir, "model.onnx", INT8)


def convert_fp16(source_dir: Path, out_dir: Path) -> Path:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    out_dir.mkdir(parents=True, exist_ok=True)
    model = OnnxModel(onnx.load(str(source_dir / "model.onnx")))
    model.convert_float_to_float16(keep_io_types=True)  # logits stay float32 for every caller
    model.save_model_to_file(str(out_dir / "model.onnx"))
    return _copy_side_files(source_dir, out_dir, "model.onnx", FP16)


def build_and_bless(hf_dir: Path, fp32_dir: Path, out_root: Path, reference_logits: np.ndarray, texts: list[str],
                    y: np.ndarray, budgets: dict[str, VariantBudget], tuning_texts: list[str] | None = None,
                    ) -> tuple[dict[str, Path], dict[str, Blessing]]:
    """Every variant this base can have, next to ``fp32_dir``, each blessed or not
    against its budget. A variant that cannot be built (an architecture the
    optimizer does not know) is logged and left out; int8 keeps the first of
    ``INT8_SCOPES`` within budget, or the last tried (``smoothed`` only with
    ``tuning_texts``, unlabeled sentences that are not the test split's)."""
    folders = {FP32: fp32_dir}
    try:
        folders[OPTIMIZED] = export_optimized(hf_dir, fp32_dir, out_root / OPTIMIZED)
    except Exception as err:  # the plain export still serves; the reason is in the log
        log.warning("fp32-optimized not built: %s: %s", type(err).__name__, err)
    source = folders.get(OPTIMIZED, fp32_dir)
    folders[FP16] = convert_fp16(source, out_root / FP16)
    blessings = {name: bless(name, folder, reference_logits, texts, y, budgets[name]) for name, folder in folders.items()}
    attempts: list[str] = []
    for scope in (s for s in INT8_SCOPES if s != "smoothed" or tuning_texts):
        folder = quantize_int8(source, out_root / f"{INT8}-{scope}", scope, tuning_texts)
        blessing = bless(INT8, folder, reference_logits, texts, y, budgets[INT8])
        blessing.scope, blessing.earlier_attempts = scope, list(attempts)
        folders[INT8], blessings[INT8] = folder, blessing
        if blessing.blessed:
            break
        attempts.append(blessing.summary())
    return folders, blessings


def _macro_f1(y: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, predicted, labels=list(range(classes)), average="macro", zero_division=0))


def _seq_per_s(model: OnnxClassifier, texts: list[str]) -> float:
    sample = texts[:SPEED_TEXTS]
    model.logits(sample[:16])  # warm-up
    start = time.perf_counter()
    model.logits(sample)
    return len(sample) / (time.perf_counter() - start)


def bless(variant: str, folder: Path, reference_logits: np.ndarray, texts: list[str], y: np.ndarray,
          budget: VariantBudget) -> Blessing:
    """Scores the variant on the test texts and checks it against its budget."""
    model = OnnxClassifier(folder, providers=["CPUExecutionProvider"])
    logits = model.logits(texts)
    flips = int((logits.argmax(axis=1) != reference_logits.argmax(axis=1)).sum())
    classes = reference_logits.shape[1]
    delta_pt = 100 * (_macro_f1(y, logits.argmax(axis=1), classes) - _macro_f1(y, reference_logits.argmax(axis=1), classes))
    result = Blessing(
        variant=variant, blessed=True, n=len(texts),
        max_abs_diff=float(np.abs(logits - reference_logits).max()) if texts else 0.0,
        label_flips=flips, flip_rate=flips / max(len(texts), 1), macro_f1_delta_pt=delta_pt,
        cpu_seq_per_s=_seq_per_s(model, texts),
        verified_on="CPUExecutionProvider" + ("; unverified on GPU" if variant == FP16 else ""),
    )
    if budget.max_abs_diff is not None and result.max_abs_diff > budget.max_abs_diff:
        result.reasons.append(f"max |logit diff| {result.max_abs_diff:.1e} > {budget.max_abs_diff:.0e}")
    if result.flip_rate > budget.max_flip_rate:
        result.reasons.append(f"label flips {100 * result.flip_rate:.2f} % > {100 * budget.max_flip_rate:.2f} %")
    if -delta_pt > budget.max_macro_f1_drop_pt:
        result.reasons.append(f"macro-F1 {delta_pt:+.2f} pt, more than {budget.max_macro_f1_drop_pt:.2f} pt lower")
    result.blessed = not result.reasons
    return result


def default_cpu_variant(blessings: dict[str, Blessing]) -> str:
    """The fastest blessed CPU variant; fp32 must be blessed for any to be served."""
    served = [b for name, b in blessings.items() if name in CPU_VARIANTS and b.blessed]
    if not served:
        raise ValueError("no CPU variant was blessed")
    return max(served, key=lambda b: b.cpu_seq_per_s).variant


def blessing_record(blessings: dict[str, Blessing], default_cpu: str) -> dict:
    return {"default_cpu": default_cpu, "variants": {name: asdict(b) for name, b in blessings.items()}}

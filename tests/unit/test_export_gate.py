import numpy as np
import onnx

from pipeline.config import ReleaseConfig, VariantBudget
from pipeline.data.ingest import load_split
from pipeline.export.variants import _feed_forward_matmuls, bless, build_and_bless, default_cpu_variant
from pipeline.train.evaluate import label_ids
from pipeline.train.model import load_classifier, predict_logits
from serving.model import OnnxClassifier


def test_onnx_has_dynamic_batch_and_sequence_axes(tiny_onnx):
    graph = onnx.load(str(tiny_onnx / "model.onnx")).graph
    for tensor in graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value") and not dims[1].HasField("dim_value"), tensor.name


def test_every_variant_is_blessed_against_its_own_budget(ingested, tiny_classifier, tiny_onnx, tmp_path):
    test = load_split(ingested.labeled_dir, "test")
    texts, y = test["text"].tolist(), label_ids(test["label"])
    model, tokenizer = load_classifier(str(tiny_classifier))
    reference = predict_logits(model, tokenizer, texts, 64)
    budgets = ReleaseConfig().budgets
    folders, blessings = build_and_bless(tiny_classifier, tiny_onnx, tmp_path, reference, texts, y, budgets)
    fp32, optimized = blessings["fp32"], blessings["fp32-optimized"]
    assert fp32.blessed and fp32.n == len(texts) and fp32.max_abs_diff < 1e-4 and fp32.label_flips == 0
    assert optimized.blessed, optimized.reasons
    fused = {node.op_type for node in onnx.load(str(folders["fp32-optimized"] / "model.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= fused  # the optimizer fused the tiny BERT
    assert any(node.op_type in {"DynamicQuantizeMatMul", "MatMulInteger"}
               for node in onnx.load(str(folders["int8"] / "model.onnx")).graph.node)
    assert "unverified on GPU" in blessings["fp16"].verified_on
    for name, folder in folders.items():  # each folder is servable as it is, and says what it is
        served = OnnxClassifier(folder)
        assert served.variant == name and served.logits(texts[:3]).shape == (3, 3)
    strict = VariantBudget(max_abs_diff=1e-12)
    refused = bless("fp32", tiny_onnx, reference, texts, y, strict)
    assert not refused.blessed and "max |logit diff|" in refused.reasons[0]
    assert default_cpu_variant({**blessings, "int8": refused}) in {"fp32", "fp32-optimized"}


def test_int8_tries_every_matmul_then_smoothed_then_attention_only(ingested, tiny_classifier, tiny_onnx, tmp_path):
    test = load_split(ingested.labeled_dir, "test")
    tuning = load_split(ingested.labeled_dir, "validation")["text"].tolist()
    texts, y = test["text"].tolist(), label_ids(test["label"])
    model, tokenizer = load_classifier(str(tiny_classifier))
    reference = predict_logits(model, tokenizer, texts, 64)
    never = {**ReleaseConfig().budgets, "int8": VariantBudget(max_abs_diff=1e-12)}
    folders, blessings = build_and_bless(tiny_classifier, tiny_onnx, tmp_path, reference, texts, y, never, tuning)
    int8 = blessings["int8"]
    assert not int8.blessed and int8.scope == "attention" and len(int8.earlier_attempts) == 2
    assert "every MatMul" in int8.earlier_attempts[0] and "smoothed" in int8.earlier_attempts[1]
    assert "feed-forward kept fp32" in int8.summary()
    graph = onnx.load(str(folders["int8"] / "model.onnx")).graph
    float_matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    layers = 2  # the tiny BERT's: two feed-forward projections each stay fp32
    assert len(float_matmuls) == 2 * layers
    assert len(_feed_forward_matmuls(onnx.load(str(folders["fp32-optimized"] / "model.onnx")))) == 2 * layers
    # The smoothed scope: a Mul before every feed-forward MatMul, all but one of them int8.
    smoothed = onnx.load(str(tmp_path / "int8-smoothed" / "model.onnx")).graph
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in smoothed.node) == 2 * layers
    assert sum(n.op_type == "MatMul" for n in smoothed.node) == 1


def test_smoothing_keeps_the_function_in_fp32(ingested, tiny_onnx, tmp_path):
    from pipeline.export.smoothing import activation_maxima, smooth
    from pipeline.export.variants import _copy_side_files

    texts = load_split(ingested.labeled_dir, "validation")["text"].tolist()
    model = onnx.load(str(tiny_onnx / "model.onnx"))
    del model.graph.value_info[:]
    matmuls = _feed_forward_matmuls(model)
    reference = OnnxClassifier(tiny_onnx)
    activations = sorted({n.input[0] for n in model.graph.node if n.name in matmuls})
    maxima = activation_maxima(tiny_onnx / "model.onnx", reference, texts, activations, tmp_path / "work")
    assert all(m.ndim == 1 and (m > 0).all() for m in maxima.values())
    onnx.save(smooth(model, set(matmuls), maxima), str(tmp_path / "model.onnx"))
    _copy_side_files(tiny_onnx, tmp_path, "model.onnx", "fp32")
    np.testing.assert_allclose(OnnxClassifier(tmp_path).logits(texts), reference.logits(texts), atol=1e-4)


def test_onnx_classifier_handles_any_batch_and_length(tiny_onnx):
    model = OnnxClassifier(tiny_onnx, batch_size=3)
    texts = ["Up.", "Net sales decreased by 5 % to EUR 10 mn . " * 30, "Flat quarter for the group .", "x", "y"]
    probabilities = model.probabilities(texts)
    assert probabilities.shape == (5, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    one_by_one = np.vstack([model.logits([t]) for t in texts])
    np.testing.assert_allclose(model.logits(texts), one_by_one, atol=1e-4)

import numpy as np
import onnx

from pipeline.config import ReleaseConfig
from pipeline.data.ingest import load_split
from pipeline.export.onnx import check_parity
from pipeline.release.gate import decide_promotion
from serving.model import OnnxClassifier


def test_onnx_has_dynamic_batch_and_sequence_axes(tiny_onnx):
    graph = onnx.load(str(tiny_onnx / "model.onnx")).graph
    for tensor in graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value") and not dims[1].HasField("dim_value"), tensor.name


def test_onnx_parity_with_pytorch_on_the_test_split(ingested, tiny_classifier, tiny_onnx):
    texts = load_split(ingested.labeled_dir, "test")["text"].tolist()
    parity = check_parity(tiny_classifier, tiny_onnx, texts, 64)
    assert parity["n"] == len(texts)
    assert parity["max_abs_diff"] < 1e-4
    assert parity["label_flips"] == 0


def test_onnx_classifier_handles_any_batch_and_length(tiny_onnx):
    model = OnnxClassifier(tiny_onnx, batch_size=3)
    texts = ["Up.", "Net sales decreased by 5 % to EUR 10 mn . " * 30, "Flat quarter for the group .", "x", "y"]
    predictions = model.predict(texts)
    assert len(predictions) == 5
    assert all(abs(sum(p.scores.values()) - 1) < 1e-5 for p in predictions)
    assert {p.label for p in predictions} <= {"negative", "neutral", "positive"}
    one_by_one = np.vstack([model.logits([t]) for t in texts])
    np.testing.assert_allclose(model.logits(texts), one_by_one, atol=1e-4)


def test_gate_first_model_needs_the_floor():
    cfg = ReleaseConfig(min_macro_f1=0.6)
    assert decide_promotion({"macro_f1": 0.61}, None, cfg).promote
    rejected = decide_promotion({"macro_f1": 0.59}, None, cfg)
    assert not rejected.promote and "floor" in rejected.reason


def test_gate_candidate_must_be_at_least_as_good_as_champion():
    cfg = ReleaseConfig(min_macro_f1=0.6)
    assert decide_promotion({"macro_f1": 0.80}, {"macro_f1": 0.80}, cfg).promote
    worse = decide_promotion({"macro_f1": 0.79}, {"macro_f1": 0.80}, cfg)
    assert not worse.promote and "worse" in worse.reason
    strict = ReleaseConfig(min_improvement=0.01)
    assert not decide_promotion({"macro_f1": 0.805}, {"macro_f1": 0.80}, strict).promote

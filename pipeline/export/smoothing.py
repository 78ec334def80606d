"""int8 for the feed-forward layers too: SmoothQuant's per-channel migration of
activation outliers into the weights, before dynamic quantization.

Each feed-forward MatMul's input x is divided per channel by
s = max|x|^alpha / max|w|^(1-alpha) and the weight's rows are multiplied by s:
the same function in fp32, with a flatter activation for the quantizer's
single per-tensor scale. Written here because onnxruntime's quantizer offers
smoothing only through Intel Neural Compressor, which the lock does not hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ALPHA = 0.9  # bench/RESULTS.md, "Release variants": 0.5 / 0.8 / 0.9 / 1.0 gave 30 / 17 / 12 / 15 flips


def activation_maxima(onnx_path: Path, classifier, texts: list[str], tensors: list[str], work: Path) -> dict:
    """max |x| per channel of each named tensor of the graph over ``texts``, padding left out."""
    import onnx
    import onnxruntime as ort

    probe = onnx.load(str(onnx_path))
    del probe.graph.value_info[:]
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    work.mkdir(parents=True, exist_ok=True)
    onnx.save(probe, str(work / "probe.onnx"))
    session = ort.InferenceSession(str(work / "probe.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    maxima: dict[str, np.ndarray] = {}
    ids = classifier.encode(texts)
    for start in range(0, len(ids), 8):
        feeds = classifier.feeds(ids[start : start + 8])
        mask = feeds["attention_mask"]
        values = session.run(tensors, {k: v for k, v in feeds.items() if k in inputs})
        for name, value in zip(tensors, values):
            found = np.abs(value.reshape(-1, value.shape[-1])[mask.reshape(-1).astype(bool)]).max(0)
            maxima[name] = np.maximum(maxima[name], found) if name in maxima else found
    (work / "probe.onnx").unlink()
    return maxima


def smooth(model, matmuls: set[str], maxima: dict, alpha: float = ALPHA):
    """``model`` (an ONNX ModelProto, changed in place and returned) with a Mul by 1/s
    before each of ``matmuls`` and its constant weight's rows multiplied by s."""
    import onnx
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.name in matmuls and node.input[1] in initializers:  # x @ W with W constant; else left as is
            activation, weight_name = node.input[0], node.input[1]
            weight = numpy_helper.to_array(initializers[weight_name])
            scale = np.clip(maxima[activation] ** alpha / np.maximum(np.abs(weight).max(1), 1e-8) ** (1 - alpha),
                            1e-5, 1e5)
            initializers[weight_name].CopyFrom(
                numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), weight_name))
            inverse = numpy_helper.from_array((1 / scale).astype(np.float32), f"{node.name}_smooth")
            model.graph.initializer.append(inverse)
            nodes.append(onnx.helper.make_node("Mul", [activation, inverse.name], [f"{node.name}_smoothed_input"],
                                               name=f"{node.name}_smooth"))
            node.input[0] = f"{node.name}_smoothed_input"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model

"""ONNX models the tests build themselves with the `onnx` helper API (no converter needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset and IR version every ONNX Runtime since 1.14 loads.
OPSET = 17
IR_VERSION = 8


def _save(graph: onnx.GraphProto, folder: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pyserving-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def export_onnx_scaler(base: Path, version: int = 1, factor: float | None = None) -> Path:
    """Two inputs, three outputs, a dynamic batch dimension, float32 and int64.

    x float32 [batch, 3], k int64 [batch] ->
    scaled = x * factor (float32 [batch, 3]; factor defaults to the version number, so versions differ),
    total = the sum of each row of x (float32 [batch]), next = k + 1 (int64 [batch]).
    """
    factor = float(version) if factor is None else factor
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "factor"], ["scaled"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
            helper.make_node("Add", ["k", "one"], ["next"]),
        ],
        "scaler",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("next", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(factor, np.float32), "factor"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
        ],
    )
    return _save(graph, base / str(version))


# The classifier's weights: pixels [batch, 4] @ WEIGHTS = scores [batch, 3] (small integers: exact floats).
CLASSIFIER_WEIGHTS = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], np.float32)


def export_onnx_classifier(base: Path, version: int = 1) -> Path:
    """A classifier's shape: pixels float32 [batch, 4] -> scores float32 [batch, 3] and classes int64 [batch]
    (the index of each row's highest score)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixels", "weights"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["classes"], axis=1, keepdims=0),
        ],
        "classifier",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("classes", TensorProto.INT64, [None]),
        ],
        initializer=[numpy_helper.from_array(CLASSIFIER_WEIGHTS, "weights")],
    )
    return _save(graph, base / str(version))


def export_onnx_text(base: Path, version: int = 1) -> Path:
    """String tensors: text string [n] -> same (Identity) and twice (text, then text again: [2n])."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["text"], ["same"]),
            helper.make_node("Concat", ["text", "text"], ["twice"], axis=0),
        ],
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [
            helper.make_tensor_value_info("same", TensorProto.STRING, ["n"]),
            helper.make_tensor_value_info("twice", TensorProto.STRING, [None]),
        ],
    )
    return _save(graph, base / str(version))


# The flower model's weights: size [batch, 2] @ FLOWER_WEIGHTS (+ count) = scores [batch, 3].
FLOWER_WEIGHTS = np.array([[1, 0, 2], [0, 1, 1]], np.float32)


def export_onnx_flowers(base: Path, version: int = 1) -> Path:
    """A classifier and regressor in one graph, fed from tf.Example features of every kind.

    size float32 [batch, 2], count int64 [batch], color string [batch, 1] ->
    scores = size @ FLOWER_WEIGHTS + count (float32 [batch, 3]),
    classes = [color, "iris", "rose"] per row (string [batch, 3]: the color shows string features arrive),
    outputs = size[0] + size[1] + count (float32 [batch, 1]).
    """
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["count"], ["count_float"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["count_float", "axis_one"], ["count_column"]),
            helper.make_node("MatMul", ["size", "weights"], ["product"]),
            helper.make_node("Add", ["product", "count_column"], ["scores"]),
            helper.make_node("Shape", ["color"], ["color_shape"]),
            helper.make_node("Slice", ["color_shape", "zero", "one", "zero"], ["rows_shape"]),
            helper.make_node("Concat", ["rows_shape", "two"], ["labels_shape"], axis=0),
            helper.make_node("Expand", ["names", "labels_shape"], ["labels"]),
            helper.make_node("Concat", ["color", "labels"], ["classes"], axis=1),
            helper.make_node("ReduceSum", ["size", "axis_one"], ["size_sum"], keepdims=1),
            helper.make_node("Add", ["size_sum", "count_column"], ["outputs"]),
        ],
        "flowers",
        [
            helper.make_tensor_value_info("size", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("count", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("color", TensorProto.STRING, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("classes", TensorProto.STRING, ["batch", 3]),
            helper.make_tensor_value_info("outputs", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[
            numpy_helper.from_array(FLOWER_WEIGHTS, "weights"),
            numpy_helper.from_array(np.array([1], np.int64), "axis_one"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([2], np.int64), "two"),
            helper.make_tensor("names", TensorProto.STRING, [1, 2], [b"iris", b"rose"]),
        ],
    )
    return _save(graph, base / str(version))


def export_onnx_ranker(base: Path, version: int = 1) -> Path:
    """A classifier whose classes are int64 indices: x float32 [batch, 3] -> the top 2 of x * 10,
    scores float32 [batch, 2] and classes int64 [batch, 2] (their indices)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "ten"], ["scaled"]),
            helper.make_node("TopK", ["scaled", "k"], ["scores", "classes"], axis=1),
        ],
        "ranker",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("classes", TensorProto.INT64, [None, 2]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(10, np.float32), "ten"),
            numpy_helper.from_array(np.array([2], np.int64), "k"),
        ],
    )
    return _save(graph, base / str(version))

"""The ONNX runtime in-process: signatures, dtypes, strings, errors, and how a platform is detected."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tensorflow as tf
from onnx import TensorProto, helper
from onnx_models import IR_VERSION, OPSET, export_onnx_flowers, export_onnx_ranker, export_onnx_scaler, export_onnx_text

from pyserving.errors import Code, ServingError
from pyserving.lifecycle import model_config, sources
from pyserving.runtimes import onnx_model, registry

pytest.importorskip("onnxruntime")


def load(path) -> object:
    return registry.load(registry.ONNX_PLATFORM, str(path), registry.RuntimeOptions())


def test_scaler_runs_outputs_in_the_order_asked(tmp_path):
    servable = load(export_onnx_scaler(tmp_path, 2))
    outputs = servable.run(
        "serving_default", {"x": np.array([[1, 2, 3]], np.float32), "k": np.array([4])}, ["next", "scaled"], 0
    )
    assert [o.tolist() for o in outputs] == [[5], [[2.0, 4.0, 6.0]]]
    assert [o.dtype for o in outputs] == [np.int64, np.float32]
    assert servable.runtime == "ONNX"
    servable.close()


def test_run_multi_shares_one_run(tmp_path):
    servable = load(export_onnx_scaler(tmp_path, 1))
    feeds = {"x": np.array([[1, 1, 1]], np.float32), "k": np.array([0])}
    results = servable.run_multi([("serving_default", ["total"]), ("serving_default", ["next", "total"])], feeds, 0)
    assert [[a.tolist() for a in r] for r in results] == [[[3.0]], [[1], [3.0]]]


def test_wrong_dtype_names_the_input(tmp_path):
    servable = load(export_onnx_scaler(tmp_path, 1))
    with pytest.raises(ServingError) as failure:
        servable.run("serving_default", {"x": np.ones((1, 3), np.float32), "k": np.array([1], np.int32)}, ["next"], 0)
    assert (failure.value.code, failure.value.message) == (
        Code.INVALID_ARGUMENT,
        "Expects input k to be int64 but int32 is provided",
    )


def test_strings_go_in_and_come_out_as_bytes(tmp_path):
    servable = load(export_onnx_text(tmp_path))
    assert servable.signature_defs["serving_default"].inputs["text"].dtype == 7  # DT_STRING
    text = np.array(["é".encode(), b"ab"], object)
    same, twice = servable.run("serving_default", {"text": text}, ["same", "twice"], 0)
    assert same.tolist() == ["é".encode(), b"ab"]
    assert twice.tolist() == ["é".encode(), b"ab", "é".encode(), b"ab"]
    with pytest.raises(ServingError) as failure:
        servable.run("serving_default", {"text": np.array([b"\xff"], object)}, ["same"], 0)
    assert failure.value.message == "Input text of the ONNX model takes UTF-8 strings; a value is not UTF-8"


def test_missing_file_and_non_tensor_outputs_fail_the_load(tmp_path):
    with pytest.raises(ServingError) as failure:
        load(tmp_path)
    assert (failure.value.code, failure.value.message) == (
        Code.NOT_FOUND,
        f"Could not find model.onnx at supplied export directory path: {tmp_path}",
    )
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["items"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("items", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(ServingError) as failure:
        load(tmp_path)
    assert (failure.value.code, failure.value.message) == (
        Code.UNIMPLEMENTED,
        "The ONNX model's output items is a seq(tensor(float)), which TF Serving's APIs cannot carry; "
        "only tensors of numeric, bool and string types are served",
    )


def test_inter_op_parallelism_above_one_runs_in_parallel_mode(tmp_path):
    export_onnx_scaler(tmp_path, 1)
    servable = registry.load(registry.ONNX_PLATFORM, str(tmp_path / "1"), registry.RuntimeOptions((), 1, 2))
    assert servable.run("serving_default", {"x": np.ones((1, 3), np.float32), "k": np.array([1])}, ["next"], 0)[
        0
    ].tolist() == [2]


def test_platform_is_detected_from_the_newest_version_folder(tmp_path):
    assert sources.detect_platform(str(tmp_path / "missing")) == "tensorflow"
    export_onnx_scaler(tmp_path, 1)
    (tmp_path / "2").mkdir()  # an empty newer folder (still being copied) does not decide
    (tmp_path / "notes").mkdir()
    assert registry.detect(str(tmp_path / "1")) == "onnx"
    assert registry.detect(str(tmp_path / "2")) is None
    assert sources.detect_platform(str(tmp_path)) == "onnx"
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "3" / "model.onnx").write_bytes(b"")
    assert sources.detect_platform(str(tmp_path)) == "tensorflow"  # a SavedModel wins
    assert model_config.single_model("m", str(tmp_path), "onnx")[0].platform == "onnx"  # the flag wins
    with pytest.raises(ServingError, match="^INVALID_ARGUMENT: Model m requests unsupported platform tflite2$"):
        model_config.single_model("m", str(tmp_path), "tflite2")


def test_config_file_accepts_the_onnx_platform():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(
        'model_config_list { config { name: "a" base_path: "/m/a" model_platform: "onnx" } }',
        model_server_config_pb2.ModelServerConfig(),
    )
    assert [c.platform for c in model_config.from_proto(config)] == ["onnx"]


def examples(*features: dict) -> np.ndarray:
    """tf.Examples, serialized, from {name: values}: floats, ints and bytes pick the Feature's kind."""
    serialized = []
    for named in features:
        example = tf.train.Example()
        for name, values in named.items():
            feature = example.features.feature[name]
            kind = {float: feature.float_list, int: feature.int64_list, bytes: feature.bytes_list}[type(values[0])]
            kind.value.extend(values)
        serialized.append(example.SerializeToString())
    return np.array(serialized, object)


def test_only_classifier_and_regressor_outputs_add_example_signatures(tmp_path):
    assert list(load(export_onnx_scaler(tmp_path / "scaler", 1)).signature_defs) == ["serving_default"]
    assert list(load(export_onnx_text(tmp_path / "text")).signature_defs) == ["serving_default"]
    assert list(load(export_onnx_flowers(tmp_path / "flowers")).signature_defs) == [
        "serving_default",
        "classify",
        "regress",
    ]
    assert onnx_model.signature_defs(str(tmp_path / "flowers" / "1"), registry.RuntimeOptions()).keys() == {
        "serving_default",
        "classify",
        "regress",
    }


def test_int64_classes_answer_as_decimal_strings(tmp_path):
    servable = load(export_onnx_ranker(tmp_path))
    assert servable.signature_defs["classify"].outputs["classes"].dtype == 7  # DT_STRING
    assert servable.signature_defs["serving_default"].outputs["classes"].dtype == 9  # DT_INT64: unchanged
    classes, scores = servable.run(
        "classify", {"inputs": examples({"x": [1.0, 3.0, 2.0]}, {"x": [0.5, 0.0, 0.25]})}, ["classes", "scores"], 0
    )
    assert (classes.tolist(), scores.tolist()) == ([[b"1", b"2"], [b"0", b"2"]], [[30.0, 20.0], [5.0, 2.5]])
    (indices,) = servable.run("serving_default", {"x": np.array([[1, 3, 2]], np.float32)}, ["classes"], 0)
    assert indices.tolist() == [[1, 2]]


def test_classify_and_regress_share_one_parse_and_run(tmp_path):
    servable = load(export_onnx_flowers(tmp_path))
    inputs = {"inputs": examples({"size": [1.0, 2.0], "count": [3], "color": [b"red"]})}
    (scores,), (outputs,) = servable.run_multi([("classify", ["scores"]), ("regress", ["outputs"])], inputs, 0)
    assert (scores.tolist(), outputs.tolist()) == ([[4.0, 5.0, 7.0]], [[6.0]])
    with pytest.raises(ServingError) as failure:
        servable.run_multi([("serving_default", ["scores"]), ("regress", ["outputs"])], inputs, 0)
    assert failure.value.message == (
        "The ONNX model's serving_default signature cannot run in one request with its example signatures: regress"
    )


FLOWER_FEATURES = {
    "size": tf.io.FixedLenFeature([2], tf.float32),
    "count": tf.io.FixedLenFeature([], tf.int64),
    "color": tf.io.FixedLenFeature([1], tf.string),
}


@pytest.mark.parametrize(
    "bad",
    [
        {"size": [1.0, 2.0], "count": [1]},
        {"size": [1.0, 2.0], "count": [1.0], "color": [b"red"]},
        {"size": [1.0], "count": [1], "color": [b"red"]},
        {"size": [1.0, 2.0], "count": [1, 2], "color": [b"red"]},
        {"size": [1.0, 2.0], "count": [1], "color": [5]},
    ],
)
def test_feature_errors_say_what_tf_parse_example_says(tmp_path, bad):
    """TF's own op's message (what a SavedModel with a parsing signature answers), without its op suffix."""
    good = {"size": [0.0, 0.0], "count": [0], "color": [b"x"]}
    serialized = examples(good, bad)
    with pytest.raises(tf.errors.InvalidArgumentError) as expected:
        tf.io.parse_example(serialized, FLOWER_FEATURES)
    with pytest.raises(ServingError) as failure:
        load(export_onnx_flowers(tmp_path)).run("regress", {"inputs": serialized}, ["outputs"], 0)
    assert failure.value.code == Code.INVALID_ARGUMENT
    assert failure.value.message == expected.value.message.split("}} ", 1)[1].removesuffix(" [Op:ParseExampleV2]")


def test_undecodable_examples_and_non_string_inputs_are_invalid_argument(tmp_path):
    servable = load(export_onnx_flowers(tmp_path))
    with pytest.raises(ServingError) as failure:
        servable.run("classify", {"inputs": np.array([b"\xff\xff"], object)}, ["scores"], 0)
    assert failure.value.message == "Name: <unknown>, Could not parse example input, value: b'\\xff\\xff'"
    # TF says "Can't parse serialized Example." for too many bytes values; the count is clearer.
    too_many = examples({"size": [1.0, 2.0], "count": [1], "color": [b"red", b"blue"]})
    with pytest.raises(ServingError) as failure:
        servable.run("classify", {"inputs": too_many}, ["scores"], 0)
    assert failure.value.message == (
        "Name: <unknown>, Key: color, Index: 0.  Number of bytes values != expected.  "
        "Values size: 2 but output shape: [1]"
    )
    with pytest.raises(ServingError) as failure:
        servable.run("classify", {"inputs": np.array([1.0], np.float32)}, ["scores"], 0)
    assert failure.value.message == "Expects input inputs to be string but float is provided"

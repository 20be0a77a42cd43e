"""The ONNX runtime in-process: signatures, dtypes, strings, errors, and how a platform is detected."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import IR_VERSION, OPSET, export_onnx_scaler, export_onnx_text

from pyserving.errors import Code, ServingError
from pyserving.lifecycle import model_config
from pyserving.runtimes import registry

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
    assert model_config.detect_platform(str(tmp_path / "missing")) == "tensorflow"
    export_onnx_scaler(tmp_path, 1)
    (tmp_path / "2").mkdir()  # an empty newer folder (still being copied) does not decide
    (tmp_path / "notes").mkdir()
    assert registry.detect(str(tmp_path / "1")) == "onnx"
    assert registry.detect(str(tmp_path / "2")) is None
    assert [c.platform for c in model_config.single_model("m", str(tmp_path))] == ["onnx"]
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "3" / "model.onnx").write_bytes(b"")
    assert model_config.single_model("m", str(tmp_path))[0].platform == "tensorflow"  # a SavedModel wins
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

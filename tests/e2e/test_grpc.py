"""gRPC PredictionService and ModelService through the official tensorflow-serving-api stubs."""

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import HALF_PLUS_TWO, MODELS, predict_request
from models import export_kitchen
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)


@pytest.fixture(scope="module")
def channel(half_plus_two):
    with grpc.insecure_channel(half_plus_two.grpc) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.mark.smoke
def test_predict_with_make_tensor_proto(stub):
    response = stub.Predict(predict_request(), timeout=30)
    y = response.outputs["y"]
    assert y.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in y.tensor_shape.dim] == [3, 1]
    assert list(y.float_val) == [2.5, 3.0, 4.5]
    assert y.tensor_content == b""
    assert response.model_spec.name == "half_plus_two"
    assert response.model_spec.version.value == 123
    assert response.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tf.make_ndarray(y), [[2.5], [3.0], [4.5]])


def test_predict_with_tensor_content_input(stub):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    array = np.array([[2.0], [4.0]], np.float32)
    request.inputs["x"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_content=array.tobytes(), tensor_shape={"dim": [{"size": 2}, {"size": 1}]}
        )
    )
    assert list(stub.Predict(request, timeout=30).outputs["y"].float_val) == [3.0, 4.0]


def test_predict_specific_version_and_signature(stub):
    request = predict_request(version=123, signature_name="regress_x2_to_y3")
    request.inputs["inputs"].CopyFrom(request.inputs.pop("x"))
    response = stub.Predict(request, timeout=30)
    assert list(response.outputs["outputs"].float_val) == [3.5, 4.0, 5.5]
    assert response.model_spec.signature_name == "regress_x2_to_y3"


@pytest.mark.smoke
def test_metadata_and_status(channel, stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "half_plus_two"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 123
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    assert set(signature_map.signature_def) == {
        "serving_default",
        "classify_x_to_y",
        "regress_x_to_y",
        "regress_x_to_y2",
        "regress_x2_to_y3",
    }
    assert signature_map.signature_def["serving_default"].inputs["x"].name == "x:0"

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "half_plus_two"}), timeout=30
    )
    assert len(status.model_version_status) == 1
    entry = status.model_version_status[0]
    assert (entry.version, entry.state, entry.status.error_code) == (123, 30, 0)


def expect_error(call, request, code, message):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    assert info.value.code() == code
    assert info.value.details() == message


def test_predict_errors(stub):
    bad = grpc.StatusCode
    expect_error(stub.Predict, predict_request("nope"), bad.NOT_FOUND, "Servable not found for request: Latest(nope)")
    expect_error(
        stub.Predict,
        predict_request(version=7),
        bad.NOT_FOUND,
        "Servable not found for request: Specific(half_plus_two, 7)",
    )
    expect_error(
        stub.Predict,
        predict_request(version_label="canary"),
        bad.INVALID_ARGUMENT,
        "Unrecognized servable version label: canary",
    )
    expect_error(stub.Predict, predict_request(""), bad.INVALID_ARGUMENT, "ModelSpec has no name specified.")
    expect_error(stub.Predict, predict_pb2.PredictRequest(), bad.INVALID_ARGUMENT, "Missing ModelSpec")
    expect_error(
        stub.Predict,
        predict_request(signature_name="foo"),
        bad.FAILED_PRECONDITION,
        'Serving signature key "foo" not found.',
    )
    extra = predict_request()
    extra.inputs["z"].CopyFrom(tf.make_tensor_proto([1.0]))
    expect_error(
        stub.Predict,
        extra,
        bad.INVALID_ARGUMENT,
        "input size does not match signature: 2!=1 len({x,z}) != len({x}). Sent extra: {z}. Missing but required: {}.",
    )
    renamed = predict_request()
    renamed.inputs["z"].CopyFrom(renamed.inputs.pop("x"))
    expect_error(
        stub.Predict,
        renamed,
        bad.INVALID_ARGUMENT,
        "input tensor alias not found in signature: z. Inputs expected to be in the set {x}.",
    )
    filtered = predict_request()
    filtered.output_filter.append("nope")
    expect_error(
        stub.Predict,
        filtered,
        bad.INVALID_ARGUMENT,
        "output tensor alias not found in signature: nope Outputs expected to be in the set {y}.",
    )
    filtered = predict_request()
    filtered.output_filter.extend(["y", "y"])
    expect_error(stub.Predict, filtered, bad.INVALID_ARGUMENT, "duplicate output tensor alias: y")
    broken = predict_request()
    broken.inputs["x"].tensor_content = b"\x00\x01\x02"
    expect_error(stub.Predict, broken, bad.INVALID_ARGUMENT, "tensor parsing error: x")
    for dims in ([2**62, 4], [2**40, 2**20]):  # more elements than int64 counts; more bytes than any machine has
        huge = predict_request()
        huge.inputs["x"].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT, float_val=[1.0], tensor_shape={"dim": [{"size": d} for d in dims]}
            )
        )
        expect_error(stub.Predict, huge, bad.INVALID_ARGUMENT, "tensor parsing error: x")


def test_metadata_and_status_errors(channel, stub):
    bad = grpc.StatusCode
    expect_error(
        stub.GetModelMetadata,
        get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "x"}),
        bad.INVALID_ARGUMENT,
        "GetModelMetadataRequest must specify at least one metadata_field",
    )
    expect_error(
        stub.GetModelMetadata,
        get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "half_plus_two"}, metadata_field=["foo"]),
        bad.INVALID_ARGUMENT,
        "Metadata field %s is not supportedfoo",
    )
    no_spec = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    expect_error(stub.GetModelMetadata, no_spec, bad.INVALID_ARGUMENT, "Missing ModelSpec")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    expect_error(
        models.GetModelStatus,
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"}),
        bad.NOT_FOUND,
        "Could not find any versions of model nope",
    )
    expect_error(
        models.GetModelStatus,
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "half_plus_two", "version": {"value": 9}}),
        bad.NOT_FOUND,
        "Could not find version 9 of model half_plus_two",
    )


def test_tensor_content_responses_and_unix_socket(start_server, tmp_path):
    socket_path = tmp_path / "serving.sock"
    start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--enable_serialization_as_tensor_content=true",
        f"--grpc_socket_path={socket_path}",
        rest=False,
    )
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        response = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(predict_request(), timeout=30)
    y = response.outputs["y"]
    assert list(y.float_val) == []
    assert np.frombuffer(y.tensor_content, np.float32).tolist() == [2.5, 3.0, 4.5]
    np.testing.assert_array_equal(tf.make_ndarray(y), [[2.5], [3.0], [4.5]])


def test_strings_and_defaults_over_grpc(start_server, tmp_path):
    base = export_kitchen(tmp_path / "kitchen")
    server = start_server("--model_name=kitchen", f"--model_base_path={base}")
    with grpc.insecure_channel(server.grpc) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        request = predict_pb2.PredictRequest(model_spec={"name": "kitchen", "signature_name": "types"})
        request.inputs["text"].CopyFrom(tf.make_tensor_proto([b"ab", b"\xffz"]))
        request.inputs["count"].CopyFrom(tf.make_tensor_proto(np.array([5, 6], np.int64)))
        request.inputs["flag"].CopyFrom(tf.make_tensor_proto([True, False]))
        request.output_filter.extend(["length", "text"])
        response = stub.Predict(request, timeout=30)
        assert set(response.outputs) == {"length", "text"}
        assert list(response.outputs["text"].string_val) == [b"ab", b"\xffz"]
        assert list(response.outputs["length"].int_val) == [2, 2]

        slow = predict_pb2.PredictRequest(model_spec={"name": "kitchen", "signature_name": "slow"})
        slow.inputs["n"].CopyFrom(tf.make_tensor_proto(10**10, dtype=tf.int64))
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(slow, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        slow.inputs["n"].CopyFrom(tf.make_tensor_proto(5, dtype=tf.int64))
        assert list(stub.Predict(slow, timeout=30).outputs["count"].int64_val) == [5]

        # float_val / double_val as TF writes them: every value (the same as REST's exact JSON text gives),
        # the shape present even for a scalar.
        x = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float32)
        for signature, dtype, field in (("floats", np.float32, "float_val"), ("doubles", np.float64, "double_val")):
            request = predict_pb2.PredictRequest(model_spec={"name": "kitchen", "signature_name": signature})
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(x.astype(dtype)))
            third = stub.Predict(request, timeout=30).outputs["third"]
            assert [d.size for d in third.tensor_shape.dim] == [300, 7] and third.tensor_content == b""
            rest = requests.post(
                f"{server.rest}/v1/models/kitchen:predict",
                timeout=30,
                json={"signature_name": signature, "inputs": x.tolist()},
            ).json()["outputs"]
            rest = rest["third"] if signature == "floats" else rest  # one output: columnar JSON gives it bare
            assert list(getattr(third, field)) == np.array(rest, dtype).ravel().tolist()
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(dtype(1.5)))
            scalar = stub.Predict(request, timeout=30).outputs["third"]
            assert scalar.HasField("tensor_shape") and not scalar.tensor_shape.dim
            assert list(getattr(scalar, field)) == [0.5]


def test_omitted_input_uses_signature_defaults(start_server):
    # The TF2 test model's serving_default declares defaults {x: [0.0]}: TF Serving lets a client omit x.
    server = start_server(
        "--model_name=tf2", f"--model_base_path={MODELS / 'saved_model_half_plus_two_tf2_cpu'}", rest=False
    )
    with grpc.insecure_channel(server.grpc) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        response = stub.Predict(predict_pb2.PredictRequest(model_spec={"name": "tf2"}), timeout=30)
    assert list(response.outputs["y"].float_val) == [2.0]


def test_signature_method_name_check(start_server):
    server = start_server(
        "--model_name=m", f"--model_base_path={HALF_PLUS_TWO}", "--enable_signature_method_name_check=true"
    )
    with grpc.insecure_channel(server.grpc) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        request = predict_request("m", signature_name="regress_x2_to_y3")
        request.inputs["inputs"].CopyFrom(request.inputs.pop("x"))
        expect_error(
            stub.Predict,
            request,
            grpc.StatusCode.INTERNAL,
            "Expected prediction signature method_name to be one of {tensorflow/serving/predict, "
            "tensorflow/serving/classify, tensorflow/serving/regress}. Was: tensorflow/serving/regress",
        )
        assert list(stub.Predict(predict_request("m"), timeout=30).outputs["y"].float_val) == [2.5, 3.0, 4.5]

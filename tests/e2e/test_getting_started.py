"""The README's getting-started path, step by step, with the outputs it shows (smoke tier: every Python version)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import run_cli
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def example(start_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "half_plus_two"
    result = run_cli("example", str(base))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Wrote half_plus_two to {base / '1'}\n"
    return start_server("--model_name=half_plus_two", f"--model_base_path={base}")


def test_predict_with_curl_prints_tf_servings_layout(example):
    r = requests.post(f"{example.rest}/v1/models/half_plus_two:predict", data='{"instances": [1.0, 2.0, 5.0]}')
    assert r.status_code == 200
    assert r.text == '{\n    "predictions": [2.5, 3.0, 4.5\n    ]\n}'


def test_regress_and_classify_on_tf_examples(example):
    body = '{"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}'
    r = requests.post(f"{example.rest}/v1/models/half_plus_two:regress", data=body)
    assert r.text == '{\n    "results": [2.5, 3.0]\n}'
    body = '{"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}]}'
    r = requests.post(f"{example.rest}/v1/models/half_plus_two:classify", data=body)
    assert r.text == '{\n    "results": [[["", 2.5]]\n    ]\n}'


def test_status_with_requests(example):
    status = requests.get(f"{example.rest}/v1/models/half_plus_two").json()
    assert status == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }


def test_predict_with_the_official_grpc_client(example):
    with grpc.insecure_channel(example.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "half_plus_two"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0], [2.0], [5.0]], np.float32)))
        response = stub.Predict(request, timeout=10)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[2.5], [3.0], [4.5]]
    assert response.model_spec.version.value == 1


def test_version_names_both_libraries():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["TensorFlow ModelServer: 0.1.0-pyserving", "TensorFlow Library: 2.21.0"]

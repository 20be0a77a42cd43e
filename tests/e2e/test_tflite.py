"""`--prefer_tflite_model`: version folders with `model.tflite` served through the TFLite interpreter.

TF Serving's own end-to-end cases (testPredictOnTfLite, testPredictWithSignatureDefOnTfLite) with the
models converted here (`tflite_models`), and the rest of the server around them: REST, metadata,
status, versions and labels, batching, warmup, load failures and bad input.
"""

from __future__ import annotations

import concurrent.futures
import json

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import (
    grpc_predict,
    post,
    predict_request,
    run_cli,
    statuses,
    wait_for,
    write_config,
    write_warmup,
)
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc
from tf_serving_models import export_half_plus_two
from tflite_models import tflite_half_plus_two, write_tflite

PREFER = "--prefer_tflite_model=true"


def _tensor(name: str, shape: list[int]) -> dict:
    dims = [{"size": str(size), "name": ""} for size in shape]
    return {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}


def _metadata(version: int, x_name: str, y_name: str) -> dict:
    """GetModelMetadata as TF Serving answers for a half_plus_two TFLite model (shapes are the tensors' [1, 1])."""
    signature = {
        "inputs": {"x": _tensor(x_name, [1, 1])},
        "outputs": {"y": _tensor(y_name, [1, 1])},
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    return {
        "model_spec": {"name": "m", "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }


def _tf_serving_predict(channel) -> predict_pb2.PredictResponse:
    """TF Serving's VerifyPredictRequest: x = [2.0] (shape [1]) against the model's [1, 1] input."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.signature_name = "serving_default"
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.append(2.0)
    request.inputs["x"].tensor_shape.dim.add().size = 1
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


# (how the model carries its signature, the metadata's input and output tensor names)
KINDS = [
    # saved_model_half_plus_two_tflite: no SignatureDef; one is made from the tensors, aliased by name.
    ("none", "x", "y"),
    # saved_model_half_plus_two_tflite_with_sigdef: SignatureDefs in the model's metadata, names fixed up.
    ("metadata", "tflite_input", "y"),
    # today's converter: the signature runner's signatures (pyserving's extension; TF Serving ignores them).
    ("runner", "serving_default_x:0", "PartitionedCall:0"),
]


@pytest.mark.parametrize(("kind", "x_name", "y_name"), KINDS, ids=[k[0] for k in KINDS])
def test_tflite_serves_rest_grpc_metadata_and_status(start_server, tmp_path, kind, x_name, y_name):
    write_tflite(tmp_path / "m", 123, tflite_half_plus_two(kind))
    server = start_server("--model_name=m", f"--model_base_path={tmp_path / 'm'}", PREFER)
    url = f"{server.rest}/v1/models/m"
    r = post(url + ":predict", {"instances": [1.0, 2.0, 5.0]})
    assert (r.status_code, r.json()) == (200, {"predictions": [2.5, 3.0, 4.5]})
    r = post(url + ":predict", {"inputs": {"x": [[1.0], [2.0], [5.0]]}})
    assert (r.status_code, r.json()) == (200, {"outputs": [[2.5], [3.0], [4.5]]})
    r = post(url + ":predict", {"signature_name": "serving_default", "instances": [[1.0], [2.0]]})
    assert (r.status_code, r.json()) == (200, {"predictions": [[2.5], [3.0]]})
    assert requests.get(url + "/metadata", timeout=10).json() == _metadata(123, x_name, y_name)
    assert requests.get(url, timeout=10).json() == {
        "model_version_status": [
            {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    with grpc.insecure_channel(server.grpc) as channel:
        response = _tf_serving_predict(channel)
        assert list(response.outputs) == ["y"]
        assert response.outputs["y"].dtype == types_pb2.DT_FLOAT
        assert list(response.outputs["y"].float_val) == [3.0]
        assert (response.model_spec.name, response.model_spec.version.value) == ("m", 123)
        assert response.model_spec.signature_name == "serving_default"
        response = grpc_predict(channel, "m", x=(1.0, 2.0, 5.0))
        assert list(response.outputs["y"].float_val) == [2.5, 3.0, 4.5]
        assert [d.size for d in response.outputs["y"].tensor_shape.dim] == [3, 1]
    assert "planned" not in server.output()


def test_versions_and_labels(start_server, tmp_path):
    base = tmp_path / "m"
    write_tflite(base, 1, tflite_half_plus_two("none", plus=2.0))
    write_tflite(base, 2, tflite_half_plus_two("runner", plus=3.0))
    config = write_config(
        tmp_path / "models.config",
        {
            "name": "m",
            "path": base,
            "extra": "model_version_policy { all {} } version_labels { key: 'stable' value: 1 }",
        },
    )
    server = start_server(f"--model_config_file={config}", PREFER, "--allow_version_labels_for_unavailable_models")
    assert statuses(server, "m") == [(2, "AVAILABLE", "OK"), (1, "AVAILABLE", "OK")]
    body = {"instances": [1.0]}
    assert post(f"{server.rest}/v1/models/m:predict", body).json() == {"predictions": [3.5]}
    assert post(f"{server.rest}/v1/models/m/versions/1:predict", body).json() == {"predictions": [2.5]}
    assert post(f"{server.rest}/v1/models/m/labels/stable:predict", body).json() == {"predictions": [2.5]}
    with grpc.insecure_channel(server.grpc) as channel:
        response = grpc_predict(channel, "m", x=(1.0,), version_label="stable")
        assert (response.model_spec.version.value, list(response.outputs["y"].float_val)) == (1, [2.5])
        response = grpc_predict(channel, "m", x=(1.0,), version=2)
        assert (response.model_spec.version.value, list(response.outputs["y"].float_val)) == (2, [3.5])


def test_batching_merges_concurrent_requests(start_server, tmp_path):
    write_tflite(tmp_path / "m", 1, tflite_half_plus_two("none"))
    params = tmp_path / "batching.config"
    params.write_text(
        "max_batch_size { value: 64 } batch_timeout_micros { value: 2000 } num_batch_threads { value: 2 }"
    )
    server = start_server(
        "--model_name=m",
        f"--model_base_path={tmp_path / 'm'}",
        PREFER,
        "--enable_batching",
        f"--batching_parameters_file={params}",
    )

    def call(i: int) -> tuple[int, dict]:
        r = post(f"{server.rest}/v1/models/m:predict", {"instances": [[float(i)], [float(i + 1)]]})
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(40)))
    assert results == [(200, {"predictions": [[0.5 * i + 2], [0.5 * (i + 1) + 2]]}) for i in range(40)]


def test_several_interpreters_per_pool_split_a_large_request(start_server, tmp_path):
    """TF Serving runs mini-batches of ceil(500 / 2) = 250 rows on the interpreters at once: 600 rows are 3."""
    write_tflite(tmp_path / "m", 1, tflite_half_plus_two("none"))
    server = start_server(
        "--model_name=m",
        f"--model_base_path={tmp_path / 'm'}",
        PREFER,
        "--num_tflite_pools=2",
        "--num_tflite_interpreters_per_pool=2",
    )
    with grpc.insecure_channel(server.grpc) as channel:
        response = grpc_predict(channel, "m", x=[float(i) for i in range(600)])
    assert list(response.outputs["y"].float_val) == [0.5 * i + 2 for i in range(600)]
    assert [d.size for d in response.outputs["y"].tensor_shape.dim] == [600, 1]


def test_warmup_records_are_replayed_through_the_interpreter(start_server, tmp_path):
    folder = write_tflite(tmp_path / "m", 123, tflite_half_plus_two("metadata"))
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(predict_request("m", (1.0, 2.0)))
    write_warmup(folder, [log.SerializeToString()] * 2)
    server = start_server("--model_name=m", f"--model_base_path={tmp_path / 'm'}", PREFER)
    assert "Number of warmup records read: 2." in server.output()
    assert post(f"{server.rest}/v1/models/m:predict", {"instances": [2.0]}).json() == {"predictions": [3.0]}


def test_a_warmup_record_of_the_wrong_type_fails_the_load(start_server, tmp_path):
    folder = write_tflite(tmp_path / "m", 123, tflite_half_plus_two("none"))
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.model_spec.name = "m"
    log.predict_log.request.inputs["x"].dtype = types_pb2.DT_INT32
    log.predict_log.request.inputs["x"].int_val.append(1)
    write_warmup(folder, [log.SerializeToString()])
    server = start_server(
        "--model_name=m", f"--model_base_path={tmp_path / 'm'}", PREFER, "--max_num_load_retries=0", ready=False
    )
    assert server.proc.wait(120) == 255
    assert "INVALID_ARGUMENT: Input x expects float but int32 is provided" in server.output()


def test_without_the_flag_a_folder_with_both_serves_its_saved_model(start_server, tmp_path):
    """TF Serving keeps model_platform "tensorflow": the flag picks model.tflite when the folder has one."""
    base = tmp_path / "m"
    export_half_plus_two(base, 123)  # 0.5x + 2
    (base / "00000123" / "model.tflite").write_bytes(tflite_half_plus_two("none", plus=3.0))  # 0.5x + 3
    body = {"instances": [1.0]}
    plain = start_server("--model_name=m", f"--model_base_path={base}")
    preferred = start_server("--model_name=m", f"--model_base_path={base}", PREFER)
    assert post(f"{plain.rest}/v1/models/m:predict", body).json() == {"predictions": [2.5]}
    assert post(f"{preferred.rest}/v1/models/m:predict", body).json() == {"predictions": [3.5]}
    # The SavedModel's five signatures against the TFLite model's one.
    signatures = requests.get(f"{plain.rest}/v1/models/m/metadata", timeout=10).json()["metadata"]["signature_def"]
    assert len(signatures["signature_def"]) == 5


def test_inspect_shows_what_the_flag_would_serve(tmp_path):
    base = tmp_path / "m"
    export_half_plus_two(base, 123)
    (base / "00000123" / "model.tflite").write_bytes(tflite_half_plus_two("none"))
    write_tflite(tmp_path / "only", 7, tflite_half_plus_two("none"))
    both = json.loads(run_cli("inspect", str(base), "--json").stdout)
    assert (both["versions"], both["platform"], both["runtime"]) == ([123], "tensorflow", "tf_saved_model")
    assert len(both["signatures"]) == 5
    preferred = json.loads(run_cli("inspect", str(base), "--json", "--prefer_tflite_model").stdout)
    only = run_cli("inspect", str(tmp_path / "only")).stdout
    assert preferred["runtime"] == "tflite_model"
    assert preferred["signatures"] == {
        "serving_default": {
            "method_name": "tensorflow/serving/predict",
            "inputs": {"x": {"dtype": "DT_FLOAT", "shape": [1, 1], "name": "x"}},
            "outputs": {"y": {"dtype": "DT_FLOAT", "shape": [1, 1], "name": "y"}},
        }
    }
    assert only.startswith("Versions: 7\nPlatform: tensorflow (runtime: tflite_model)\n"), only
    assert 'Signature "serving_default" (tensorflow/serving/predict)\n  inputs:\n    x: DT_FLOAT [1, 1] (x)\n' in only


def test_a_corrupt_model_tflite_fails_its_version_and_the_older_one_keeps_serving(start_server, tmp_path):
    base = tmp_path / "m"
    write_tflite(base, 1, tflite_half_plus_two("none"))
    server = start_server(
        "--model_name=m",
        f"--model_base_path={base}",
        PREFER,
        "--max_num_load_retries=0",
        "--file_system_poll_wait_seconds=1",
    )
    staging = write_tflite(tmp_path / "staging", 2, b"\x1c\x00\x00\x00TFL3 this is not a flatbuffer" * 4)
    staging.rename(base / "2")
    wait_for(lambda: (2, "END", "INVALID_ARGUMENT") in statuses(server, "m"), what="version 2 to fail")
    status = requests.get(f"{server.rest}/v1/models/m/versions/2", timeout=10).json()
    assert status == {
        "model_version_status": [
            {
                "version": "2",
                "state": "END",
                "status": {
                    "error_code": "INVALID_ARGUMENT",
                    "error_message": "Cannot build FlatBufferModel from buffer: "
                    "The model is not a valid Flatbuffer buffer",
                },
            }
        ]
    }
    r = post(f"{server.rest}/v1/models/m:predict", {"instances": [2.0]})
    assert (r.status_code, r.json()) == (200, {"predictions": [3.0]})
    with grpc.insecure_channel(server.grpc) as channel:
        assert grpc_predict(channel, "m", x=(2.0,)).model_spec.version.value == 1


def test_wrong_input_is_invalid_argument(start_server, tmp_path):
    write_tflite(tmp_path / "m", 1, tflite_half_plus_two("none"))
    server = start_server("--model_name=m", f"--model_base_path={tmp_path / 'm'}", PREFER)
    r = post(f"{server.rest}/v1/models/m:predict", {"instances": ["a"]})
    assert (r.status_code, r.json()) == (
        400,
        {
            "error": "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: "
            'JSON Value: "a" Type: String is not of expected type: float'
        },
    )
    r = post(f"{server.rest}/v1/models/m:predict", {"inputs": {"z": [1.0]}})
    assert (r.status_code, r.json()) == (400, {"error": "Missing named input: x in 'inputs' object."})
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].dtype = types_pb2.DT_STRING
    request.inputs["x"].string_val.append(b"a")
    request.inputs["x"].tensor_shape.dim.add().size = 1
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as error:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == "Input x expects float but string is provided"
        # 11 dimensions would crash LiteRT's XNNPACK delegate: refused before it runs.
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros([1] * 11, np.float32)))
        with pytest.raises(grpc.RpcError) as error:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == "Input x has 11 dimensions; the TFLite model takes at most 6"
        # The interpreter still serves after the refusals.
        assert list(grpc_predict(channel, "m", x=(2.0,)).outputs["y"].float_val) == [3.0]

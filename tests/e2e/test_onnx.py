"""ONNX models (`model_platform: "onnx"`, or a version folder holding model.onnx) through every API a TF model has."""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import copy_version, post, run_cli, statuses, wait_for, write_warmup
from onnx_models import export_onnx_classifier, export_onnx_scaler
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

pytest.importorskip("onnxruntime")


def scaler_request(x, k, version: int | None = None, label: str = "", output_filter=()) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "scaler"
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array(x, np.float32)))
    request.inputs["k"].CopyFrom(tf.make_tensor_proto(np.array(k, np.int64)))
    request.output_filter.extend(output_filter)
    return request


def metric(server, name: str) -> float:
    lines = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + " ", name + "{")))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    export_onnx_scaler(root / "scaler", 1)
    export_onnx_scaler(root / "scaler", 2)
    warmup = prediction_log_pb2.PredictionLog()
    warmup.predict_log.request.CopyFrom(scaler_request([[1, 2, 3]], [1]))
    write_warmup(root / "scaler" / "2", [warmup.SerializeToString()] * 2)
    export_onnx_classifier(root / "classifier")
    (root / "monitoring.config").write_text("prometheus_config { enable: true }")
    return root


@pytest.fixture(scope="module")
def server(start_server, models):
    """Both models from a config file (model_platform "onnx"): scaler versions 1 and 2, labelled."""
    config = models / "models.config"
    config.write_text(
        "model_config_list {\n"
        f'  config {{ name: "scaler" base_path: "{models / "scaler"}" model_platform: "onnx"\n'
        "    model_version_policy { specific { versions: 1 versions: 2 } }\n"
        '    version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 } }\n'
        f'  config {{ name: "classifier" base_path: "{models / "classifier"}" model_platform: "onnx" }}\n'
        "}\n"
    )
    return start_server(
        f"--model_config_file={config}",
        "--allow_version_labels_for_unavailable_models",
        f"--monitoring_config_file={models / 'monitoring.config'}",
    )


def test_rest_predict_row_format(server):
    body = {"instances": [{"x": [1.0, 2.0, 3.0], "k": 5}, {"x": [0.5, 0.0, -1.0], "k": -2}]}
    r = post(server.rest + "/v1/models/scaler/versions/2:predict", body)
    assert r.status_code == 200
    assert r.json() == {
        "predictions": [
            {"next": 6, "scaled": [2.0, 4.0, 6.0], "total": 6.0},
            {"next": -1, "scaled": [1.0, 0.0, -2.0], "total": -0.5},
        ]
    }


def test_rest_predict_columnar_format(server):
    r = post(server.rest + "/v1/models/scaler/versions/1:predict", {"inputs": {"x": [[1, 2, 3]], "k": [7]}})
    assert (r.status_code, r.json()) == (200, {"outputs": {"next": [8], "scaled": [[1.0, 2.0, 3.0]], "total": [6.0]}})


def test_labels_pick_their_versions(server):
    for label, factor in (("stable", 1.0), ("canary", 2.0)):
        r = post(server.rest + f"/v1/models/scaler/labels/{label}:predict", {"inputs": {"x": [[1, 1, 1]], "k": [0]}})
        assert r.json()["outputs"]["scaled"] == [[factor] * 3]
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            scaler_request([[3, 3, 3]], [0], label="stable", output_filter=["scaled"]), timeout=30
        )
    assert (response.model_spec.version.value, list(response.outputs)) == (1, ["scaled"])


def test_grpc_predict_with_output_filter(server):
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            scaler_request([[1, 2, 3], [4, 5, 6]], [10, 20], output_filter=["next", "total"]), timeout=30
        )
    assert response.model_spec.name == "scaler"
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    assert sorted(response.outputs) == ["next", "total"]
    assert tf.make_ndarray(response.outputs["next"]).tolist() == [11, 21]
    assert response.outputs["next"].dtype == tf.int64.as_datatype_enum
    assert tf.make_ndarray(response.outputs["total"]).tolist() == [6.0, 15.0]


def test_metadata_is_a_signature_def_of_the_graph(server):
    r = requests.get(server.rest + "/v1/models/scaler/versions/1/metadata", timeout=10)
    assert r.status_code == 200

    def tensor(name, dtype, *dims):
        return {
            "dtype": dtype,
            "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False},
            "name": name,
        }

    assert r.json() == {
        "model_spec": {"name": "scaler", "signature_name": "", "version": "1"},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    "serving_default": {
                        "inputs": {"x": tensor("x", "DT_FLOAT", -1, 3), "k": tensor("k", "DT_INT64", -1)},
                        "outputs": {
                            "scaled": tensor("scaled", "DT_FLOAT", -1, 3),
                            "total": tensor("total", "DT_FLOAT", -1),
                            "next": tensor("next", "DT_INT64", -1),
                        },
                        "method_name": "tensorflow/serving/predict",
                        "defaults": {},
                    }
                }
            }
        },
    }
    with grpc.insecure_channel(server.grpc) as channel:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "classifier"
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert sorted(signature.inputs) == ["pixels"] and sorted(signature.outputs) == ["classes", "scores"]
    assert [d.size for d in signature.outputs["scores"].tensor_shape.dim] == [-1, 3]


def test_status_of_both_versions(server):
    r = requests.get(server.rest + "/v1/models/scaler", timeout=10)
    ok = {"error_code": "OK", "error_message": ""}
    assert r.json() == {
        "model_version_status": [
            {"version": "2", "state": "AVAILABLE", "status": ok},
            {"version": "1", "state": "AVAILABLE", "status": ok},
        ]
    }


def test_warmup_records_were_replayed(server, models):
    assert "Number of warmup records read: 2." in server.output()
    path = models / "scaler" / "2"  # counted per version path
    assert metric(server, f':tensorflow:serving:model_warmup_records_read{{model_path="{path}",status="OK"}}') == 2


def test_runtime_latency_is_labelled_onnx(server):
    post(server.rest + "/v1/models/classifier:predict", {"instances": [[1, 1, 1, 1]]})
    assert (
        metric(
            server, ':tensorflow:serving:runtime_latency_count{API="Predict",model_name="classifier",runtime="ONNX"}'
        )
        >= 1
    )


def test_classifier_scores_and_classes(server):
    r = post(server.rest + "/v1/models/classifier:predict", {"instances": [[1, 0, 0, 0], [0, 1, 1, 0], [1, 2, 3, 4]]})
    assert (r.status_code, r.json()) == (
        200,
        {
            "predictions": [
                {"classes": 0, "scores": [1.0, 0.0, 0.0]},
                {"classes": 2, "scores": [0.0, 2.0, 3.0]},
                {"classes": 2, "scores": [5.0, 8.0, 13.0]},
            ]
        },
    )


def test_classify_api_answers_a_clear_error(server):
    """Classify takes serialized tf.Examples, which an ONNX graph cannot parse."""
    r = post(server.rest + "/v1/models/classifier:classify", {"examples": [{"pixels": [1.0, 0.0, 0.0, 0.0]}]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("No classification inputs found in SignatureDef: ")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            {"inputs": {"x": [[1, 2, 3, 4]], "k": [1]}},
            "Got invalid dimensions for input: x for the following indices\n index: 1 Got: 4 Expected: 3\n"
            " Please fix either the inputs/outputs or the model.",
        ),
        (
            {"inputs": {"x": [1, 2, 3], "k": [1]}},
            "Invalid rank for input: x Got: 1 Expected: 2 Please fix either the inputs/outputs or the model.",
        ),
        ({"inputs": {"x": [[1, 2, 3]], "k": [1.5]}}, "JSON Value: 1.5 Type: Number is not of expected type: int64"),
        (
            {"inputs": {"x": [[1, 2, 3]]}},
            "Missing named input: k in 'inputs' object.",
        ),
    ],
)
def test_bad_input_is_a_400_with_the_reason(server, body, error):
    r = post(server.rest + "/v1/models/scaler:predict", body)
    assert (r.status_code, r.json()) == (400, {"error": error})


def test_grpc_wrong_dtype_is_invalid_argument(server):
    request = scaler_request([[1, 2, 3]], [1])
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1, 2, 3]], np.float64)))
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as failure:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "Expects input x to be float but double is provided"


def test_batching_gives_every_caller_its_own_rows(start_server, models, tmp_path):
    """Single-model flags without --model_platform: the folder holds model.onnx, so it is detected."""
    batching = tmp_path / "batching.config"
    batching.write_text(
        "max_batch_size { value: 8 } batch_timeout_micros { value: 3000 } max_enqueued_batches { value: 1000 } "
        "num_batch_threads { value: 2 } allowed_batch_sizes: 4 allowed_batch_sizes: 8"
    )
    server = start_server(
        "--model_name=scaler",
        f"--model_base_path={models / 'scaler'}",
        "--enable_batching",
        f"--batching_parameters_file={batching}",
        f"--monitoring_config_file={models / 'monitoring.config'}",
    )
    assert "Building single onnx model file config: model_name: scaler" in server.output()
    rng = random.Random(3)
    plans = [([rng.randint(-100, 100) for _ in range(rng.randint(1, 3))], rng.random() < 0.5) for _ in range(300)]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel := grpc.insecure_channel(server.grpc))
    runs_before = metric(server, ":tensorflow:serving:batching_session:wrapped_run_count")

    def call(plan):
        ks, use_grpc = plan
        xs = [[k, 1, 2] for k in ks]
        if use_grpc:
            response = stub.Predict(scaler_request(xs, ks), timeout=30)
            return tf.make_ndarray(response.outputs["scaled"]).tolist(), tf.make_ndarray(
                response.outputs["next"]
            ).tolist()
        outputs = post(server.rest + "/v1/models/scaler:predict", {"inputs": {"x": xs, "k": ks}}).json()["outputs"]
        return outputs["scaled"], outputs["next"]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, plans))
    channel.close()
    for (ks, _), (scaled, following) in zip(plans, answers, strict=True):
        assert scaled == [[2.0 * k, 2.0, 4.0] for k in ks]
        assert following == [k + 1 for k in ks]
    assert metric(server, ":tensorflow:serving:batching_session:wrapped_run_count") - runs_before < len(plans) * 0.8


def test_hot_swap_and_a_broken_version(start_server, models, tmp_path):
    """A new version folder serves once it appears; a model.onnx that does not parse fails its own load only."""
    base = tmp_path / "scaler"
    base.mkdir()
    copy_version(models / "scaler" / "1", base, 1)
    server = start_server(
        "--model_name=scaler",
        f"--model_base_path={base}",
        "--model_platform=onnx",
        "--file_system_poll_wait_seconds=1",
        "--max_num_load_retries=0",
    )
    url = server.rest + "/v1/models/scaler:predict"
    body = {"inputs": {"x": [[1, 1, 1]], "k": [0]}}
    assert post(url, body).json()["outputs"]["scaled"] == [[1.0, 1.0, 1.0]]
    staging = tmp_path / "staging"
    export_onnx_scaler(staging, 3, factor=3.0)
    copy_version(staging / "3", base, 3)
    wait_for(lambda: statuses(server, "scaler") == [(3, "AVAILABLE", "OK"), (1, "END", "OK")], what="version 3")
    assert post(url, body).json()["outputs"]["scaled"] == [[3.0, 3.0, 3.0]]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not an ONNX model")
    copy_version(broken, base, 4)
    wait_for(lambda: statuses(server, "scaler")[:1] == [(4, "END", "DATA_LOSS")], what="version 4 to fail")
    status = requests.get(server.rest + "/v1/models/scaler/versions/4", timeout=10).json()["model_version_status"][0]
    assert status["status"]["error_message"] == (
        f"Load model from {base / '4' / 'model.onnx'} failed:Protobuf parsing failed."
    )
    assert statuses(server, "scaler")[1] == (3, "AVAILABLE", "OK")
    assert post(url, body).json()["outputs"]["scaled"] == [[3.0, 3.0, 3.0]]
    shutil.rmtree(base / "4")


def test_unknown_model_platform_flag_fails_start_up(tmp_path):
    result = run_cli("--model_name=m", f"--model_base_path={tmp_path}", "--model_platform=pytorch")
    assert result.returncode == 255
    assert (
        "Failed to start server. Error: INVALID_ARGUMENT: Model m requests unsupported platform pytorch"
        in result.stdout
    )


def test_inspect_shows_onnx_versions_and_signature(models):
    result = run_cli("inspect", str(models / "scaler"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "versions": [1, 2],
        "platform": "onnx",
        "runtime": "onnx_model",
        "signatures": {
            "serving_default": {
                "method_name": "tensorflow/serving/predict",
                "inputs": {
                    "k": {"dtype": "DT_INT64", "shape": [-1], "name": "k"},
                    "x": {"dtype": "DT_FLOAT", "shape": [-1, 3], "name": "x"},
                },
                "outputs": {
                    "next": {"dtype": "DT_INT64", "shape": [-1], "name": "next"},
                    "scaled": {"dtype": "DT_FLOAT", "shape": [-1, 3], "name": "scaled"},
                    "total": {"dtype": "DT_FLOAT", "shape": [-1], "name": "total"},
                },
            }
        },
    }


def test_warmup_tool_writes_records_for_an_onnx_version(models, tmp_path):
    base = tmp_path / "classifier"
    shutil.copytree(models / "classifier", base)
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([{"instances": [[1, 2, 3, 4]]}]))
    result = run_cli("warmup", str(base), "--requests", str(bodies))
    assert (result.returncode, result.stdout) == (
        0,
        f"Wrote 1 warmup record(s) to {base / '1' / 'assets.extra' / 'tf_serving_warmup_requests'}\n",
    )
    record = prediction_log_pb2.PredictionLog.FromString(
        next(iter(tf.data.TFRecordDataset(str(base / "1" / "assets.extra" / "tf_serving_warmup_requests")))).numpy()
    )
    assert tf.make_ndarray(record.predict_log.request.inputs["pixels"]).tolist() == [[1.0, 2.0, 3.0, 4.0]]

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
from onnx_models import export_onnx_classifier, export_onnx_flowers, export_onnx_scaler
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
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
    export_onnx_flowers(root / "flowers")
    (root / "monitoring.config").write_text("prometheus_config { enable: true }")
    return root


@pytest.fixture(scope="module")
def server(start_server, models):
    """The models from a config file (model_platform "onnx"): scaler versions 1 and 2, labelled."""
    config = models / "models.config"
    config.write_text(
        "model_config_list {\n"
        f'  config {{ name: "scaler" base_path: "{models / "scaler"}" model_platform: "onnx"\n'
        "    model_version_policy { specific { versions: 1 versions: 2 } }\n"
        '    version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 } }\n'
        f'  config {{ name: "classifier" base_path: "{models / "classifier"}" model_platform: "onnx" }}\n'
        f'  config {{ name: "flowers" base_path: "{models / "flowers"}" model_platform: "onnx" }}\n'
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
    assert sorted(signatures.signature_def) == ["classify", "serving_default"]  # scores [batch, 3]: a classifier
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


def test_classify_on_the_default_predict_signature_answers_a_clear_error(server):
    """serving_default stays the graph's predict signature; Classify must name the `classify` signature."""
    r = post(server.rest + "/v1/models/classifier:classify", {"examples": [{"pixels": [1.0, 0.0, 0.0, 0.0]}]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("No classification inputs found in SignatureDef: ")


def test_classifier_scores_without_classes_classify_with_empty_labels(server):
    body = {"signature_name": "classify", "examples": [{"pixels": [1.0, 2.0, 3.0, 4.0]}]}
    r = post(server.rest + "/v1/models/classifier:classify", body)
    assert (r.status_code, r.json()) == (200, {"results": [[["", 5.0], ["", 8.0], ["", 13.0]]]})


# The flowers model's answers (see export_onnx_flowers) for FLOWER_EXAMPLES: the first example takes its
# count and color from the context, the second overrides them.
FLOWER_CONTEXT = {"count": 1, "color": "red"}
FLOWER_EXAMPLES = [{"size": [1.0, 2.0]}, {"size": [0.5, 0.25], "color": "blue", "count": 2}]
FLOWER_CLASSES = [[("red", 2.0), ("iris", 3.0), ("rose", 5.0)], [("blue", 2.5), ("iris", 2.25), ("rose", 3.25)]]
FLOWER_VALUES = [4.0, 2.75]


def flower_input(request) -> None:
    """FLOWER_CONTEXT and FLOWER_EXAMPLES as tf.Examples in a gRPC request's `input`."""

    def example(features):
        message = tf.train.Example()
        for name, value in features.items():
            feature = message.features.feature[name]
            if isinstance(value, str):
                feature.bytes_list.value.append(value.encode())
            elif isinstance(value, int):
                feature.int64_list.value.append(value)
            else:
                feature.float_list.value.extend(value)
        return message

    with_context = request.input.example_list_with_context
    with_context.context.CopyFrom(example(FLOWER_CONTEXT))
    with_context.examples.extend(example(e) for e in FLOWER_EXAMPLES)


def test_rest_classify_parses_examples_and_context_into_the_graph(server):
    body = {"signature_name": "classify", "context": FLOWER_CONTEXT, "examples": FLOWER_EXAMPLES}
    r = post(server.rest + "/v1/models/flowers:classify", body)
    assert (r.status_code, r.json()) == (
        200,
        {"results": [[list(pair) for pair in classes] for classes in FLOWER_CLASSES]},
    )


def test_grpc_classify(server):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "flowers"
    request.model_spec.signature_name = "classify"
    flower_input(request)
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=30)
    assert (response.model_spec.name, response.model_spec.version.value) == ("flowers", 1)
    assert response.model_spec.signature_name == "classify"
    assert [[(c.label, c.score) for c in e.classes] for e in response.result.classifications] == FLOWER_CLASSES


def test_rest_regress(server):
    body = {"signature_name": "regress", "context": FLOWER_CONTEXT, "examples": FLOWER_EXAMPLES}
    r = post(server.rest + "/v1/models/flowers:regress", body)
    assert (r.status_code, r.json()) == (200, {"results": FLOWER_VALUES})


def test_grpc_regress(server):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "flowers"
    request.model_spec.signature_name = "regress"
    flower_input(request)
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Regress(request, timeout=30)
    assert response.model_spec.signature_name == "regress"
    assert [r.value for r in response.result.regressions] == FLOWER_VALUES


def test_grpc_multi_inference_classifies_and_regresses(server):
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("classify", "tensorflow/serving/classify"), ("regress", "tensorflow/serving/regress")):
        task = request.tasks.add(method_name=method)
        task.model_spec.name = "flowers"
        task.model_spec.signature_name = signature
    flower_input(request)
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).MultiInference(request, timeout=30)
    classify, regress = response.results
    assert (classify.model_spec.signature_name, regress.model_spec.signature_name) == ("classify", "regress")
    assert [[(c.label, c.score) for c in e.classes] for e in classify.classification_result.classifications] == (
        FLOWER_CLASSES
    )
    assert [r.value for r in regress.regression_result.regressions] == FLOWER_VALUES


@pytest.mark.parametrize(
    ("examples", "error"),
    [
        (
            [{"size": [1.0, 2.0], "color": "red"}],
            "Name: <unknown>, Feature: count (data type: int64) is required but could not be found.",
        ),
        (
            [{"size": [1.0, 2.0], "color": "red", "count": 1}, {"size": [1, 2], "color": "red", "count": 1}],
            "Name: <unknown>, Key: size, Index: 1.  Data types don't match. Data type: int64 but expected type: float",
        ),
        (
            [{"size": [1.0, 2.0, 3.0], "color": "red", "count": 1}],
            "Name: <unknown>, Key: size, Index: 0.  Number of float values != expected.  "
            "Values size: 3 but output shape: [2]",
        ),
    ],
)
def test_a_missing_or_wrong_feature_is_a_400_naming_it(server, examples, error):
    r = post(server.rest + "/v1/models/flowers:regress", {"signature_name": "regress", "examples": examples})
    assert (r.status_code, r.json()) == (400, {"error": error})


def test_flowers_predict_and_metadata_keep_the_graph_signature(server):
    body = {"inputs": {"size": [[1.0, 2.0]], "count": [3], "color": [["red"]]}}
    r = post(server.rest + "/v1/models/flowers:predict", body)
    assert (r.status_code, r.json()) == (
        200,
        {"outputs": {"classes": [["red", "iris", "rose"]], "outputs": [[6.0]], "scores": [[4.0, 5.0, 7.0]]}},
    )
    signatures = requests.get(server.rest + "/v1/models/flowers/metadata", timeout=10).json()["metadata"]
    signatures = signatures["signature_def"]["signature_def"]
    assert sorted(signatures) == ["classify", "regress", "serving_default"]
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert sorted(signatures["serving_default"]["inputs"]) == ["color", "count", "size"]

    def tensor(name, dtype, *dims):
        return {
            "dtype": dtype,
            "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False},
            "name": name,
        }

    assert signatures["regress"] == {
        "inputs": {"inputs": tensor("inputs", "DT_STRING", -1)},
        "outputs": {"outputs": tensor("outputs", "DT_FLOAT", -1, 1)},
        "method_name": "tensorflow/serving/regress",
        "defaults": {},
    }
    assert signatures["classify"] == {
        "inputs": {"inputs": tensor("inputs", "DT_STRING", -1)},
        "outputs": {"scores": tensor("scores", "DT_FLOAT", -1, 3), "classes": tensor("classes", "DT_STRING", -1, 3)},
        "method_name": "tensorflow/serving/classify",
        "defaults": {},
    }


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

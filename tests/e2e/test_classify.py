"""Classify, Regress and MultiInference over REST and gRPC, on TF Serving's test models and a Keras classifier."""

from __future__ import annotations

import base64

import grpc
import pytest
import tensorflow as tf
from helpers import HALF_PLUS_TWO, MODELS, post, write_config
from models import COLORS, color_image, export_color_classifier
from tensorflow_serving.apis import (
    classification_pb2,
    inference_pb2,
    input_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

TF2 = MODELS / "saved_model_half_plus_two_tf2_cpu"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    """half_plus_two (TF1), its TF2 export and a Keras image classifier, in one config."""
    colors = export_color_classifier(tmp_path_factory.mktemp("colors") / "colors")
    config = write_config(
        tmp_path_factory.mktemp("config") / "models.config",
        {"name": "half_plus_two", "path": HALF_PLUS_TWO},
        {"name": "tf2", "path": TF2},
        {"name": "colors", "path": colors},
    )
    return start_server(f"--model_config_file={config}")


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def url(server, model="half_plus_two", method="classify", version=""):
    return f"{server.rest}/v1/models/{model}{version}:{method}"


def example(**features) -> tf.train.Example:
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                name: tf.train.Feature(float_list=tf.train.FloatList(value=[value])) for name, value in features.items()
            }
        )
    )


def example_input(*examples, context=None) -> input_pb2.Input:
    request_input = input_pb2.Input()
    if context is None:
        request_input.example_list.examples.extend(examples)
    else:
        request_input.example_list_with_context.examples.extend(examples)
        request_input.example_list_with_context.context.CopyFrom(context)
    return request_input


# -- REST ---------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_rest_classify_bytes_match_tf_serving(server):
    r = post(url(server), {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    # No `classes` output: the label is "".
    assert r.content == b'{\n    "results": [[["", 2.5]], [["", 3.0]]\n    ]\n}'


@pytest.mark.parametrize(
    "signature, expected",
    [
        ("regress_x_to_y", b'{\n    "results": [2.5, 3.0]\n}'),
        ("regress_x_to_y2", b'{\n    "results": [3.5, 4.0]\n}'),
    ],
)
def test_rest_regress(server, signature, expected):
    r = post(url(server, method="regress"), {"signature_name": signature, "examples": [{"x": 1.0}, {"x": 2.0}]})
    assert (r.status_code, r.content) == (200, expected)


def test_rest_context_is_merged_into_each_example(server):
    body = {"signature_name": "regress_x_to_y", "context": {"x": 4.0}, "examples": [{}, {"x": 2.0}, {"z": "s"}]}
    r = post(url(server, method="regress", version="/versions/123"), body)
    assert (r.status_code, r.json()) == (200, {"results": [4.0, 3.0, 4.0]})


def test_rest_feature_kinds(server):
    # b64 -> bytes, bool -> int64 and an unknown feature are accepted; the model only reads x.
    body = {
        "signature_name": "regress_x_to_y",
        "examples": [{"x": [3.0], "b": {"b64": base64.b64encode(b"\x00\xff").decode()}, "flag": True, "n": 7}],
    }
    assert post(url(server, method="regress"), body).json() == {"results": [3.5]}


def test_rest_tf2_model_classifies_although_its_signatures_say_predict(server):
    r = post(url(server, model="tf2"), {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
    assert r.json() == {"results": [[["", 3.0]]]}
    body = {"signature_name": "regress_x_to_y2", "examples": [{"x": 2.0}]}
    r = post(url(server, model="tf2", method="regress"), body)
    assert r.json() == {"results": [4.0]}


def test_rest_keras_image_classifier(server):
    body = {"examples": [{"image": {"b64": base64.b64encode(color_image(c)).decode()}} for c in COLORS]}
    r = post(url(server, model="colors"), body)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 3
    for color, classes in zip(COLORS, results, strict=True):
        assert [label for label, _ in classes] == list(COLORS)
        scores = [score for _, score in classes]
        assert max(scores) == scores[COLORS.index(color)] and scores[COLORS.index(color)] > 0.9
        assert abs(sum(scores) - 1.0) < 1e-4


@pytest.mark.parametrize(
    "method, body, status, message",
    [
        (
            "classify",
            {"signature_name": "classify_x_to_y"},
            400,
            'JSON Value: {\n    "signature_name": "classify_x_to_y"\n} When method is classify, key \'examples\' is '
            "expected and was not found",
        ),
        (
            "regress",
            {"examples": {}},
            400,
            "JSON Value: {\n    \"examples\": {}\n} Expecting 'examples' value to be an list/array",
        ),
        ("regress", {"examples": []}, 400, "JSON Value: {\n    \"examples\": []\n} 'examples' value is an empty array"),
        ("regress", {"examples": [1]}, 400, "Example must be JSON object but got JSON Number"),
        (
            "regress",
            {"examples": [{"x": [1, 2.5]}]},
            400,
            "Unexpected element type in feature: x expecting type: int64",
        ),
        (
            "regress",
            {"examples": [{"x": ["a", 1]}]},
            400,
            "Unexpected element type in feature: x expecting type: bytes",
        ),
        ("regress", {"examples": [{"x": None}]}, 400, "Feature: x has element with unexpected JSON type: Null"),
        ("regress", {"examples": [{"x": [[1.0]]}]}, 400, "Feature: x has element with unexpected JSON type: Array"),
        ("regress", {"examples": [{"x": {"a": 1}}]}, 400, "Feature: x has element with unexpected JSON type: Object"),
        ("regress", {"examples": [{"x": 2**63}]}, 400, "Feature: x has uint64 element. Only int64 is supported."),
        ("regress", {"examples": [{"x": {"b64": "%%%"}}]}, 400, "Unable to base64 decode"),
        ("regress", {"context": 3, "examples": [{}]}, 400, "Example must be JSON object but got JSON Number"),
        (
            "regress",
            {"signature_name": 1, "examples": [{}]},
            400,
            'JSON Value: {\n    "signature_name": 1,\n    "examples": [{}]\n} not formatted correctly. '
            "'signature_name' key must be a string value.",
        ),
        ("classify", {"signature_name": "nope", "examples": [{}]}, 400, "No signature was found with the name: nope"),
    ],
)
def test_rest_bad_requests(server, method, body, status, message):
    r = post(url(server, method=method), body)
    assert (r.status_code, r.json()) == (status, {"error": message})


def test_rest_signature_of_the_wrong_kind(server):
    r = post(url(server), {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}]})
    assert r.status_code == 400
    assert r.json()["error"].startswith(
        'Expected classification signature outputs to contain at least one of "classes" or "scores". '
        'Signature was: inputs {\n  key: "inputs"\n  value {\n    name: "tf_example:0"\n'
    )
    r = post(url(server, method="regress"), {"examples": [{"x": 1.0}]})  # serving_default is a predict signature
    assert r.status_code == 400
    assert r.json()["error"].startswith('No regression inputs found in SignatureDef: inputs {\n  key: "x"\n')


def test_rest_integer_feature_for_a_float_model_fails_in_the_model(server):
    # TF Serving's documented gotcha: 2 is an int64 feature, the model parses x as float.
    r = post(url(server, method="regress"), {"signature_name": "regress_x_to_y", "examples": [{"x": 2}]})
    assert r.status_code == 400
    assert "Data types don't match" in r.json()["error"]


def test_rest_regress_on_a_float_input_signature_fails_in_the_model(server):
    # regress_x2_to_y3 feeds the serialized examples into a float placeholder.
    r = post(url(server, method="regress"), {"signature_name": "regress_x2_to_y3", "examples": [{"x2": 1.0}]})
    assert r.status_code == 400
    assert "expect float" in r.json()["error"]


def test_rest_unknown_model_and_label(server):
    r = post(f"{server.rest}/v1/models/nope:classify", {"examples": [{}]})
    assert (r.status_code, r.json()) == (404, {"error": "Servable not found for request: Latest(nope)"})
    r = post(f"{server.rest}/v1/models/half_plus_two/labels/x:regress", {"examples": [{}]})
    assert (r.status_code, r.json()) == (400, {"error": "Unrecognized servable version label: x"})


def test_method_name_check_flag(start_server):
    server = start_server("--model_name=tf2", f"--model_base_path={TF2}", "--enable_signature_method_name_check=true")
    r = post(url(server, model="tf2"), {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
    assert (r.status_code, r.json()) == (
        400,
        {
            "error": "Expected classification signature method_name to be "
            "tensorflow/serving/classify. Was: tensorflow/serving/predict"
        },
    )
    r = post(url(server, model="tf2", method="regress"), {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]})
    assert r.json() == {
        "error": "Expected regression signature method_name to be tensorflow/serving/regress. "
        "Was: tensorflow/serving/predict"
    }


# -- gRPC ---------------------------------------------------------------------------------------------


def test_grpc_classify(stub):
    request = classification_pb2.ClassificationRequest(input=example_input(example(x=1.0), example(x=2.0)))
    request.model_spec.name = "half_plus_two"
    request.model_spec.signature_name = "classify_x_to_y"
    response = stub.Classify(request, timeout=30)
    assert response.model_spec.name == "half_plus_two"
    assert response.model_spec.version.value == 123
    assert response.model_spec.signature_name == "classify_x_to_y"
    assert [[(c.label, c.score) for c in e.classes] for e in response.result.classifications] == [
        [("", 2.5)],
        [("", 3.0)],
    ]


def test_grpc_regress_with_context_and_label_free_version(stub):
    request = regression_pb2.RegressionRequest(input=example_input(example(), example(x=3.0), context=example(x=1.0)))
    request.model_spec.name = "half_plus_two"
    request.model_spec.signature_name = "regress_x_to_y2"
    request.model_spec.version.value = 123
    response = stub.Regress(request, timeout=30)
    assert [r.value for r in response.result.regressions] == [3.5, 4.5]
    assert (response.model_spec.version.value, response.model_spec.signature_name) == (123, "regress_x_to_y2")


def test_grpc_keras_classifier(stub):
    examples = [
        tf.train.Example(
            features=tf.train.Features(
                feature={"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[color_image(c)]))}
            )
        )
        for c in COLORS
    ]
    request = classification_pb2.ClassificationRequest(input=example_input(*examples))
    request.model_spec.name = "colors"
    response = stub.Classify(request, timeout=30)
    assert response.model_spec.signature_name == "serving_default"
    for color, result in zip(COLORS, response.result.classifications, strict=True):
        best = max(result.classes, key=lambda c: c.score)
        assert best.label == color and best.score > 0.9


def _expect(call, request, code, message):
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30)
    assert (error.value.code(), error.value.details()) == (code, message)


def test_grpc_classify_and_regress_errors(stub):
    bad = grpc.StatusCode
    _expect(stub.Classify, classification_pb2.ClassificationRequest(), bad.INVALID_ARGUMENT, "Missing ModelSpec")
    _expect(stub.Regress, regression_pb2.RegressionRequest(), bad.INVALID_ARGUMENT, "Missing ModelSpec")
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "half_plus_two"
    request.model_spec.signature_name = "classify_x_to_y"
    _expect(stub.Classify, request, bad.INVALID_ARGUMENT, "Input is empty.")
    request.input.CopyFrom(example_input(example(x=1.0)))
    request.model_spec.signature_name = "nope"
    _expect(stub.Classify, request, bad.INVALID_ARGUMENT, "No signature was found with the name: nope")
    request.model_spec.name = "nope"
    _expect(stub.Classify, request, bad.NOT_FOUND, "Servable not found for request: Latest(nope)")
    regress = regression_pb2.RegressionRequest(input=example_input(example(x=1.0)))
    regress.model_spec.name = "half_plus_two"
    regress.model_spec.signature_name = "classify_x_to_y"
    with pytest.raises(grpc.RpcError) as error:
        stub.Regress(regress, timeout=30)
    assert error.value.code() == bad.INVALID_ARGUMENT
    assert error.value.details().startswith("No regression outputs found in SignatureDef: ")
    regress.model_spec.signature_name = "regress_x2_to_y3"  # a float placeholder fed serialized examples
    with pytest.raises(grpc.RpcError) as error:
        stub.Regress(regress, timeout=30)
    assert error.value.code() == bad.INVALID_ARGUMENT
    assert "expect float" in error.value.details()


def multi_request(*tasks, request_input=None) -> inference_pb2.MultiInferenceRequest:
    request = inference_pb2.MultiInferenceRequest(input=request_input or example_input(example(x=1.0), example(x=2.0)))
    for name, signature, method in tasks:
        task = request.tasks.add(method_name=method)
        task.model_spec.name = name
        task.model_spec.signature_name = signature
    return request


@pytest.mark.smoke
def test_grpc_multi_inference(stub):
    request = multi_request(
        ("half_plus_two", "classify_x_to_y", CLASSIFY_METHOD), ("half_plus_two", "regress_x_to_y2", REGRESS_METHOD)
    )
    response = stub.MultiInference(request, timeout=30)
    assert len(response.results) == 2
    first, second = response.results
    assert (first.model_spec.name, first.model_spec.signature_name, first.model_spec.version.value) == (
        "half_plus_two",
        "classify_x_to_y",
        123,
    )
    assert [[c.score for c in e.classes] for e in first.classification_result.classifications] == [[2.5], [3.0]]
    assert second.model_spec.signature_name == "regress_x_to_y2"
    assert [r.value for r in second.regression_result.regressions] == [3.5, 4.0]


@pytest.mark.parametrize(
    "tasks, code, message",
    [
        ((), grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."),
        (
            (("half_plus_two", "classify_x_to_y", CLASSIFY_METHOD), ("tf2", "regress_x_to_y", REGRESS_METHOD)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "All ModelSpecs in a MultiInferenceRequest must access the same model name.",
        ),
        (
            (("half_plus_two", "regress_x_to_y", REGRESS_METHOD), ("half_plus_two", "regress_x_to_y", REGRESS_METHOD)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Duplicate evaluation of signature: regress_x_to_y",
        ),
        (
            (("half_plus_two", "nope", REGRESS_METHOD),),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Requested signature not found in model graph: nope",
        ),
        (
            (("half_plus_two", "regress_x_to_y", "tensorflow/serving/predict"),),
            grpc.StatusCode.UNIMPLEMENTED,
            "Unsupported signature method_name: tensorflow/serving/predict",
        ),
    ],
)
def test_grpc_multi_inference_errors(stub, tasks, code, message):
    _expect(stub.MultiInference, multi_request(*tasks), code, message)


def test_grpc_multi_inference_empty_input(stub):
    request = multi_request(("half_plus_two", "regress_x_to_y", REGRESS_METHOD), request_input=input_pb2.Input())
    _expect(stub.MultiInference, request, grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")

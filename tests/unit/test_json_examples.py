"""REST classify/regress bodies to tf.Example and results back to TF Serving's JSON."""

from __future__ import annotations

import pytest
from tensorflow_serving.apis import classification_pb2, regression_pb2

from pyserving.errors import ServingError
from pyserving.protocols.tfs.json.examples import decode_input, encode_classification, encode_regression


def test_feature_kinds_follow_the_json_types():
    request_input = decode_input({"examples": [{"s": "a", "b": {"b64": "eA=="}, "i": [1, 2], "f": 1.5, "t": True}]})
    feature = request_input.example_list.examples[0].features.feature
    assert feature["s"].bytes_list.value == [b"a"]
    assert feature["b"].bytes_list.value == [b"x"]
    assert feature["i"].int64_list.value == [1, 2]
    assert feature["f"].float_list.value == [1.5]
    assert feature["t"].int64_list.value == [1]


def test_context_goes_with_the_examples():
    request_input = decode_input({"context": {"c": 1}, "examples": [{"x": 2.0}]})
    with_context = request_input.example_list_with_context
    assert with_context.context.features.feature["c"].int64_list.value == [1]
    assert with_context.examples[0].features.feature["x"].float_list.value == [2.0]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "JSON Value: {} When method is classify, key 'examples' is expected and was not found"),
        ({"examples": []}, "JSON Value: {\n    \"examples\": []\n} 'examples' value is an empty array"),
        ({"examples": [1]}, "Example must be JSON object but got JSON Number"),
        ({"examples": [{"x": [1, "a"]}]}, "Unexpected element type in feature: x expecting type: int64"),
        ({"examples": [{"x": None}]}, "Feature: x has element with unexpected JSON type: Null"),
        ({"examples": [{"x": 2**63}]}, "Feature: x has uint64 element. Only int64 is supported."),
    ],
)
def test_bad_examples_get_tf_servings_messages(doc, message):
    with pytest.raises(ServingError) as info:
        decode_input(doc)
    assert info.value.message == message


def test_classification_and_regression_layouts():
    result = classification_pb2.ClassificationResult()
    result.classifications.add().classes.extend(
        [classification_pb2.Class(label="a", score=0.25), classification_pb2.Class(label="b", score=0.75)]
    )
    assert encode_classification(result) == b'{\n    "results": [[["a", 0.25], ["b", 0.75]]\n    ]\n}'
    regression = regression_pb2.RegressionResult()
    regression.regressions.add(value=2.5)
    regression.regressions.add(value=3.0)
    assert encode_regression(regression) == b'{\n    "results": [2.5, 3.0]\n}'

"""REST `:classify` / `:regress` JSON: `examples` (and `context`) to tf.Example, results back to JSON.

Feature values map as in TF Serving's json_tensor.cc: strings and `{"b64": ...}`
become bytes_list, integers int64_list, other numbers float_list, booleans
int64 1/0; a scalar is a one-element list and the first element fixes a
feature's kind. Responses are written with the same rapidjson layout as predict.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from pyserving.errors import c_escape, invalid_argument
from pyserving.protocols.tfs.json.document import debug_string, decode_b64, is_b64, json_type
from pyserving.protocols.tfs.json.writer import PrettyWriter, format_floats, json_string

__all__ = ["decode_input", "encode_classification", "encode_regression"]

_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1
_FLOAT_MAX = float(np.finfo(np.float32).max)
_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", None: "UNKNOWN"}


def decode_input(doc: dict[str, Any]) -> input_pb2.Input:
    """The request's `examples` (with the optional `context`) as an Input proto."""
    request_input = input_pb2.Input()
    has_context = "context" in doc
    if has_context:
        _fill_example(doc["context"], request_input.example_list_with_context.context)
    if "examples" not in doc:
        # TF Serving says "classify" for :regress too.
        raise invalid_argument(
            f"JSON Value: {debug_string(doc)} When method is classify, key 'examples' is expected and was not found"
        )
    examples = doc["examples"]
    if not isinstance(examples, list):
        raise invalid_argument(f"JSON Value: {debug_string(doc)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid_argument(f"JSON Value: {debug_string(doc)} 'examples' value is an empty array")
    target = request_input.example_list_with_context.examples if has_context else request_input.example_list.examples
    for value in examples:
        _fill_example(value, target.add())
    return request_input


def _fill_example(value: Any, example: example_pb2.Example) -> None:
    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {json_type(value)}")
    features = example.features.feature
    for name, values in value.items():
        try:
            feature = features[name]
        except UnicodeEncodeError:  # the name held invalid UTF-8; tf.Example keys are proto strings
            raise invalid_argument(
                f'Feature name "{c_escape(name.encode("utf-8", "surrogateescape"))}" is not valid UTF-8'
            ) from None
        for item in values if isinstance(values, list) else [values]:
            _add_value(name, item, feature)


def _add_value(name: str, value: Any, feature: feature_pb2.Feature) -> None:
    item: bytes | int | float
    if value is None or isinstance(value, list) or (isinstance(value, dict) and not is_b64(value)):
        raise invalid_argument(f"Feature: {name} has element with unexpected JSON type: {json_type(value)}")
    if isinstance(value, bool):
        kind, item = "int64_list", int(value)
    elif isinstance(value, dict):
        kind, item = "bytes_list", decode_b64(value)
    elif isinstance(value, str):
        kind, item = "bytes_list", value.encode("utf-8", "surrogateescape")
    elif isinstance(value, int) and -_INT64_MAX - 1 <= value <= _INT64_MAX:
        kind, item = "int64_list", value
    elif isinstance(value, int) and _INT64_MAX < value <= _UINT64_MAX:
        raise invalid_argument(f"Feature: {name} has uint64 element. Only int64 is supported.")
    else:  # a JSON number with a fraction or exponent, or an integer beyond 64 bits
        item = float(value)
        if abs(item) > _FLOAT_MAX and item != float("inf") and item != float("-inf"):
            raise invalid_argument(f"Cannot convert JSON value: {item:g} to float without loss of precision.")
        kind = "float_list"
    current = feature.WhichOneof("kind")
    if current is not None and current != kind:
        raise invalid_argument(f"Unexpected element type in feature: {name} expecting type: {_KIND_NAMES[current]}")
    getattr(feature, kind).value.append(item)


def encode_classification(result: classification_pb2.ClassificationResult) -> bytes:
    """`{"results": [[[label, score], ...], ...]}`, one single-line list per example."""
    writer = PrettyWriter()
    writer.start_object()
    writer.key("results")
    writer.start_array()
    for classifications in result.classifications:
        writer.single_line = True
        writer.start_array()
        scores = format_floats(np.array([c.score for c in classifications.classes], dtype=np.float32))
        for cls, score in zip(classifications.classes, scores, strict=True):
            writer.start_array()
            writer.raw(json_string(cls.label))
            writer.raw(score)
            writer.end_array()
        writer.end_array()
        writer.single_line = False
    writer.end_array()
    writer.end_object()
    return writer.getvalue()


def encode_regression(result: regression_pb2.RegressionResult) -> bytes:
    """`{"results": [v1, v2, ...]}` on one line."""
    writer = PrettyWriter()
    writer.start_object()
    writer.key("results")
    writer.single_line = True
    writer.start_array()
    writer.raw_run(format_floats(np.array([r.value for r in result.regressions], dtype=np.float32)))
    writer.end_array()
    writer.single_line = False
    writer.end_object()
    return writer.getvalue()

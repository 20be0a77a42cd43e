"""REST predict bodies to tensors and outputs to TF Serving's exact response bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import signature_def
from tensorflow.core.framework import types_pb2

from pyserving.errors import ServingError
from pyserving.protocols.tfs.json import numeric
from pyserving.protocols.tfs.json.document import parse_object, signature_name
from pyserving.protocols.tfs.json.predict_request import COLUMNAR, ROW, decode_predict, parse_predict
from pyserving.protocols.tfs.json.predict_response import encode_predict

FLOAT_X = signature_def(x=types_pb2.DT_FLOAT)


def decode(body: bytes | str, signature=FLOAT_X):
    data = body.encode() if isinstance(body, str) else body
    doc = parse_predict(data)
    return decode_predict(doc, signature, doc.get("signature_name", ""), data)


def error(body, signature=FLOAT_X) -> str:
    with pytest.raises(ServingError) as info:
        decode(body, signature)
    return info.value.message


def test_row_and_columnar_give_the_same_float32_tensor():
    row = decode('{"instances": [[1.0], [2.5]]}')
    columnar = decode('{"inputs": [[1.0], [2.5]]}')
    assert (row.format, columnar.format) == (ROW, COLUMNAR)
    for decoded in (row, columnar):
        assert decoded.tensors["x"].dtype == np.float32
        assert decoded.tensors["x"].tolist() == [[1.0], [2.5]]


def test_named_inputs_and_typed_values():
    signature = signature_def(text=types_pb2.DT_STRING, count=types_pb2.DT_INT64, flag=types_pb2.DT_BOOL)
    body = (
        '{"instances": [{"text": "a", "count": 3, "flag": true}, '
        '{"text": {"b64": "Yg=="}, "count": -1, "flag": false}]}'
    )
    tensors = decode(body, signature).tensors
    assert tensors["text"].tolist() == [b"a", b"b"]
    assert tensors["count"].dtype == np.int64 and tensors["count"].tolist() == [3, -1]
    assert tensors["flag"].tolist() == [True, False]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"foo": 1}', "Missing 'inputs' or 'instances' key"),
        ('{"instances": []}', "JSON Value: {\n    \"instances\": []\n} No values in 'instances' array"),
        (
            '{"instances": [[1.0], [1.0, 2.0]]}',
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 1 but got: 2",
        ),
        ('{"inputs": [[1.0], [1.0, 2.0]]}', "Encountered list at unexpected size: 2 at level: 1 expected size: 1"),
        ('{"inputs": ["text"]}', 'JSON Value: "text" Type: String is not of expected type: float'),
        ('{"inputs": [true]}', "JSON Value: true Type: True is not of expected type: float"),
    ],
)
def test_bad_bodies_get_tf_servings_messages(body, message):
    assert error(body) == message


def test_int32_range_is_checked():
    assert error('{"inputs": [2147483648]}', signature_def(x=types_pb2.DT_INT32)) == (
        "JSON Value: 2147483648 Type: Number is not of expected type: int32"
    )


def test_numeric_decoder_agrees_with_the_general_path_on_large_bodies():
    values = np.random.default_rng(0).random((300, 4)).round(6).tolist()
    body = json.dumps({"instances": values}).encode()
    assert len(body) >= 4096 and numeric.parse(body) is not None  # large enough for the simdjson path
    fast = decode(body)
    general = decode_predict(json.loads(body), FLOAT_X, "", body)
    assert fast.tensors["x"].dtype == general.tensors["x"].dtype == np.float32
    assert np.array_equal(fast.tensors["x"], general.tensors["x"])


def test_numeric_decoder_declines_what_it_cannot_prove():
    ragged = json.dumps({"instances": [[1.0, 2.0]] * 300 + [[1.0]]}).encode()
    assert numeric.parse(ragged) is None
    assert numeric.parse(json.dumps({"instances": [1.0] * 1000 + ["x"]}).encode()) is None
    assert numeric.parse(json.dumps({"instances": [2**60] * 1000, "x": 1}).encode()) is None


def test_row_response_layout_one_line_per_row():
    outputs = {"y": np.array([[2.5], [3.0]], np.float32)}
    assert encode_predict(outputs, ROW) == b'{\n    "predictions": [[2.5], [3.0]\n    ]\n}'
    assert encode_predict({"y": np.array([2.5, 3.0], np.float32)}, ROW) == b'{\n    "predictions": [2.5, 3.0\n    ]\n}'


def test_row_response_with_several_outputs_is_an_object_per_row():
    outputs = {"b": np.array([1, 2], np.int64), "a": np.array([b"x", b"y"], dtype=object)}
    assert encode_predict(outputs, ROW) == (
        b'{\n    "predictions": [\n        {\n            "a": "x",\n            "b": 1\n        },\n'
        b'        {\n            "a": "y",\n            "b": 2\n        }\n    ]\n}'
    )


def test_columnar_response_and_bytes_outputs():
    assert encode_predict({"y": np.array([[1.5]], np.float32)}, COLUMNAR) == (
        b'{\n    "outputs": [\n        [\n            1.5\n        ]\n    ]\n}'
    )
    assert encode_predict({"y_bytes": np.array([b"\xff"], dtype=object)}, COLUMNAR) == (
        b'{\n    "outputs": [\n        {\n            "b64": "/w=="\n        }\n    ]\n}'
    )


def test_floats_are_written_as_tf_serving_writes_them():
    third = np.array([1 / 3, 0.1, 1e-5, 9e6, 1e9, float("nan"), float("inf")], np.float32)
    body = encode_predict({"y": third}, COLUMNAR).decode()
    texts = [line.strip().rstrip(",") for line in body.splitlines()[2:-2]]
    assert texts == ["0.333333343", "0.1", "1e-05", "9e+06", "1e+09", "NaN", "Infinity"]
    double = encode_predict({"y": np.array([1 / 3])}, COLUMNAR)
    assert double == b'{\n    "outputs": [\n        0.33333333333333331\n    ]\n}'


def test_row_format_needs_a_batch_dimension():
    with pytest.raises(ServingError) as info:
        encode_predict({"y": np.float32(1.0).reshape(())}, ROW)
    assert info.value.message == "Tensor name: y has no shape information "


def _nested(depth: int, leaf: str = "1.0") -> str:
    return "[" * depth + leaf + "]" * depth


AB = signature_def(a=types_pb2.DT_FLOAT, b=types_pb2.DT_FLOAT)


@pytest.mark.parametrize("depth", [65, 200, None])  # None: as deep as 1,024 levels of document allow
@pytest.mark.parametrize(
    ("template", "signature"),
    [
        ('{"instances": %s}', FLOAT_X),
        ('{"inputs": %s}', FLOAT_X),
        ('{"inputs": {"x": %s}}', FLOAT_X),
        ('{"instances": [{"a": 1.0, "b": %s}]}', AB),
        ('{"inputs": {"a": [1.0], "b": %s}}', AB),
    ],
)
def test_more_than_64_dimensions_decode_then_fail_as_tensorflow_refuses_the_proto(depth, template, signature):
    before = template[: template.index("%s")]
    levels = before.count("{") + before.count("[") - before.count("}") - before.count("]")
    name = "b" if signature is AB else "x"
    assert error(template % _nested(depth or 1024 - levels), signature) == f"tensor parsing error: {name}"
    assert error('{"x": NaN, "instances": %s}' % _nested(depth or 900)) == "tensor parsing error: x"  # Python's json


def test_64_dimensions_are_fine_and_deep_errors_keep_tf_servings_order():
    assert decode('{"instances": %s}' % _nested(64)).tensors["x"].ndim == 64
    assert decode('{"inputs": %s}' % _nested(64)).tensors["x"].ndim == 64
    # TF Serving decodes every input before Tensor::FromProto refuses the deep one.
    assert error('{"inputs": {"a": %s, "b": ["x"]}}' % _nested(70), AB) == (
        'JSON Value: "x" Type: String is not of expected type: float'
    )
    assert error('{"inputs": %s}' % _nested(500, '"x"')) == (
        'JSON Value: "x" Type: String is not of expected type: float'
    )
    ragged = "[" * 99 + "[1.0], [1.0, 2.0]" + "]" * 99
    assert error('{"inputs": %s}' % ragged) == "Encountered list at unexpected size: 2 at level: 99 expected size: 1"


def test_a_deep_signature_name_gets_the_signature_name_error():
    doc = parse_object(b'{"signature_name": %s, "instances": [1.0]}' % _nested(1000).encode())
    with pytest.raises(ServingError) as info:
        signature_name(doc)
    assert info.value.message == (
        'JSON Value: {\n    "signature_name": ' + "[" * 232 + " not formatted correctly. 'signature_name' key must "
        "be a string value."
    )


def test_lone_low_surrogates_are_the_bytes_rapidjson_writes():
    tensors = decode(r'{"instances": ["\udc00", "a\udfff", "\ud83d\ude00"]}', signature_def(x=types_pb2.DT_STRING))
    assert tensors.tensors["x"].tolist() == [b"\xed\xb0\x80", b"a\xed\xbf\xbf", "😀".encode()]
    assert error(r'{"instances": ["\ud800"]}', signature_def(x=types_pb2.DT_STRING)) == (
        "JSON Parse error: The surrogate pair in string is invalid. at offset: 16"
    )


def test_json_value_excerpts_put_arrays_on_one_line():
    """The both-keys and keys-mismatch errors quote the JSON as TF Serving's PrettyWriter does
    (kFormatSingleLineArray)."""
    assert error('{"instances": [[1.0, 2.0]], "inputs": {"x": [1.0, 2.0]}}') == (
        'JSON Value: {\n    "instances": [[1.0, 2.0]],\n    "inputs": {\n        "x": [1.0, 2.0]\n    }\n} '
        "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist "
    )
    assert error('{"instances": [{"a": [[1.0, 2.0], [3.0, 4.0]]}]}', AB) == (
        "Failed to process element: 0 of 'instances' list. JSON object: {\n"
        '    "a": [[1.0, 2.0], [3.0, 4.0]]\n} keys must be equal to: a,b'
    )

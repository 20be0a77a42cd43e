"""REST predict bodies to tensors and outputs to TF Serving's exact response bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import signature_def
from tensorflow.core.framework import types_pb2

from pyserving.errors import ServingError
from pyserving.protocols.tfs.json import numeric
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

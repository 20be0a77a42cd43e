"""The Open Inference Protocol's codecs in-process: datatypes, raw and JSON tensors, REST bodies, model specs."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import orjson
import pytest
from helpers import signature_def

from pyserving.errors import Code, ServingError
from pyserving.protocols.v2 import bodies, datatypes, inference
from pyserving.serving import ModelSpec, PredictResult

NUMERIC = [name for name in datatypes.DATATYPES if name != "BYTES"]


def _sample(datatype: str) -> np.ndarray:
    dtype = datatypes.DATATYPES[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    return np.arange(6).reshape(2, 3).astype(dtype)


@pytest.mark.parametrize("datatype", NUMERIC)
def test_raw_round_trip_is_little_endian_and_exact(datatype):
    array = _sample(datatype)
    raw = datatypes.to_raw(array)
    assert raw == np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    decoded = datatypes.from_raw("x", datatype, (2, 3), 6, raw)
    assert decoded.dtype == datatypes.DATATYPES[datatype]
    np.testing.assert_array_equal(decoded, array)
    assert datatypes.datatype_of(array) == datatype


def test_raw_bool_is_any_nonzero_byte():
    decoded = datatypes.from_raw("b", "BOOL", (3,), 3, b"\x00\x02\x01")
    assert decoded.tolist() == [False, True, True]


def test_raw_size_must_match_the_shape():
    with pytest.raises(ServingError) as info:
        datatypes.from_raw("x", "FP32", (2,), 2, b"\x00" * 12)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message == "input 'x' has 12 bytes of raw data; shape [2] of FP32 takes 8"


def test_raw_bytes_round_trip_with_length_prefixes():
    array = np.array([b"ab", b"", b"\xff\x00z"], dtype=object)
    raw = datatypes.to_raw(array)
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x03\x00\x00\x00\xff\x00z"
    assert datatypes.from_raw("s", "BYTES", (3,), 3, raw).tolist() == [b"ab", b"", b"\xff\x00z"]


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x02\x00\x00\x00ab\x01\x00", 2, "input 's': raw BYTES data ends before element 1 of 2"),
        (b"\x05\x00\x00\x00ab", 1, "input 's': raw BYTES element 0 is longer than the data left"),
        (b"\x01\x00\x00\x00a!", 1, "input 's': 1 bytes of raw BYTES data after the 1 elements"),
        (b"\x00" * 8, 10**12, "input 's': 8 bytes of raw BYTES data cannot hold 1000000000000 elements"),
    ],
)
def test_raw_bytes_that_do_not_add_up_are_refused(raw, count, message):
    with pytest.raises(ServingError) as info:
        datatypes.from_raw("s", "BYTES", (count,), count, raw)
    assert info.value.message == message


def test_json_data_flat_or_nested_in_row_major_order():
    flat = datatypes.from_json("x", "FP32", (2, 2), 4, [1, 2.5, 3, 4])
    nested = datatypes.from_json("x", "FP32", (2, 2), 4, [[1, 2.5], [3, 4]])
    assert flat.dtype == np.float32 and flat.tolist() == nested.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert datatypes.from_json("n", "INT64", (), 1, 7).tolist() == 7
    assert datatypes.from_json("b", "BOOL", (2,), 2, [True, False]).tolist() == [True, False]
    assert datatypes.from_json("s", "BYTES", (1, 2), 2, [["é", "b"]]).tolist() == [["é".encode(), b"b"]]
    assert datatypes.from_json("h", "FP16", (1,), 1, [0.5]).dtype == np.float16
    assert datatypes.from_json("u", "UINT64", (1,), 1, [2**64 - 1]).tolist() == [2**64 - 1]
    mixed = datatypes.from_json("u", "UINT64", (2, 2), 4, [[0, 1], [5, 2**64 - 2]])  # numpy alone reads floats
    assert mixed.dtype == np.uint64 and mixed.tolist() == [[0, 1], [5, 2**64 - 2]]


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT8", [1, 200], "input 'x' has a value out of the range of INT8"),
        ("UINT8", [-1], "input 'x' has a value out of the range of UINT8"),
        ("INT32", [1.5], "input 'x' of datatype INT32 takes integers"),
        ("FP32", ["1.5"], "input 'x' of datatype FP32 takes numbers"),
        ("FP32", [{"a": 1}], "input 'x' of datatype FP32 takes numbers"),
        ("INT64", [2**70], "input 'x' has a value out of the range of INT64"),
        ("INT64", [-1, 2**63], "input 'x' has a value out of the range of INT64"),
        ("UINT64", [-1, 2**63], "input 'x' has a value out of the range of UINT64"),
        ("UINT64", [1.0, 2**63], "input 'x' of datatype UINT64 takes integers"),
        ("BOOL", [1, 0], "input 'x' of datatype BOOL takes true and false"),
        ("BYTES", ["a", 1], "input 'x' of datatype BYTES takes strings"),
        ("FP32", [[1, 2], [3]], "input 'x' data is not a list of numbers with one size along each dimension"),
        ("FP32", [1, 2, 3], "input 'x' has 3 elements in its data; its shape [2] takes 2"),
    ],
)
def test_json_data_that_does_not_fit_the_datatype_is_refused(datatype, data, message):
    count = 2
    with pytest.raises(ServingError) as info:
        datatypes.from_json("x", datatype, (count,), count, data)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message == message


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([2, -1], "input 'x' has an invalid shape [2, -1]: dimensions are integers >= 0"),
        ([True], "input 'x' has an invalid shape [True]: dimensions are integers >= 0"),
        ([1.0], "input 'x' has an invalid shape [1.0]: dimensions are integers >= 0"),
        ([1] * 65, "input 'x' has 65 dimensions; at most 64 are allowed"),
    ],
)
def test_bad_shapes_are_refused(shape, message):
    with pytest.raises(ServingError) as info:
        datatypes.check_shape("x", "FP32", shape)
    assert info.value.message == message


def test_check_shape_counts_decoded_bytes():
    assert datatypes.check_shape("x", "FP64", [3, 4]) == ((3, 4), 12, 96)
    assert datatypes.check_shape("s", "BYTES", [5]) == ((5,), 5, 40)
    with pytest.raises(ServingError, match="invalid datatype 'FLOAT' for input 'x'"):
        datatypes.check_shape("x", "FLOAT", [1])


def test_json_outputs():
    assert datatypes.to_json("s", np.array([b"a", b"\xc3\xa9"], dtype=object)) == ["a", "é"]
    with pytest.raises(ServingError, match="output 's' holds bytes that are not UTF-8; request it as binary data"):
        datatypes.to_json("s", np.array([b"\xff"], dtype=object))
    bf16 = datatypes.to_json("b", np.array([[1.5, 2.0]], dtype=ml_dtypes.bfloat16))
    assert bf16.dtype == np.float32 and bf16.tolist() == [1.5, 2.0]
    assert orjson.dumps(datatypes.to_json("h", np.array([0.5], np.float16)), option=orjson.OPT_SERIALIZE_NUMPY) == (
        b"[0.5]"
    )


def test_signature_datatypes():
    from tensorflow.core.framework import types_pb2

    assert datatypes.datatype_of_tf(types_pb2.DT_FLOAT) == "FP32"
    assert datatypes.datatype_of_tf(types_pb2.DT_STRING) == "BYTES"
    assert datatypes.datatype_of_tf(types_pb2.DT_BFLOAT16) == "BF16"
    assert datatypes.datatype_of_tf(types_pb2.DT_COMPLEX64) == "COMPLEX64"


# -- REST bodies -------------------------------------------------------------------------------------------


def _binary_body(doc: dict, *raws: bytes) -> tuple[bytes, bytes]:
    head = orjson.dumps(doc)
    return head + b"".join(raws), str(len(head)).encode()


def test_binary_extension_splits_the_body_by_binary_data_size():
    x = np.array([1, 2, 3], np.float32)
    body, length = _binary_body(
        {
            "id": "r1",
            "parameters": {"signature_name": "s"},
            "inputs": [
                {"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}},
                {"name": "n", "shape": [1], "datatype": "INT64", "data": [4]},
                {"name": "b", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        },
        x.tobytes(),
        b"\x01\x00",
    )
    request = bodies.parse_infer(body, length)
    assert request.id == "r1" and request.parameters == {"signature_name": "s"}
    assert [(t.name, t.encoding) for t in request.inputs] == [("x", "raw"), ("n", "json"), ("b", "raw")]
    assert bytes(request.inputs[0].data) == x.tobytes() and bytes(request.inputs[2].data) == b"\x01\x00"
    assert request.outputs == ["y", "z"] and request.binary_outputs == {"y"}


@pytest.mark.parametrize(
    ("doc", "raw", "length", "message"),
    [
        ({"inputs": []}, b"", b"999", "Inference-Header-Content-Length '999' is not a length within the 13-byte body"),
        ({"inputs": []}, b"", b"-1", "Inference-Header-Content-Length '-1' is not a length within the 13-byte body"),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
            b"\x00" * 4,
            None,
            "input 'x': binary_data_size 8 is beyond the binary data",
        ),
        ({"inputs": []}, b"\x00" * 4, None, "4 bytes of binary data after the inputs' binary_data_size"),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]},
            b"",
            None,
            "input 'x' has neither 'data' nor the binary_data_size parameter",
        ),
        ({}, b"", None, "missing 'inputs'"),
        ({"inputs": {}}, b"", None, "'inputs' must be an array"),
        ({"inputs": [{"name": 1}]}, b"", None, "'name' must be a string"),
        ({"inputs": [], "parameters": []}, b"", None, "'parameters' must be an object"),
        ({"inputs": [], "outputs": [1]}, b"", None, "each of 'outputs' must be an object"),
    ],
)
def test_bad_infer_bodies_are_refused(doc, raw, length, message):
    body, head_length = _binary_body(doc, raw)
    with pytest.raises(ServingError) as info:
        bodies.parse_infer(body, length if length is not None or not raw else head_length)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message == message


def test_unparsable_json_is_a_bad_request():
    for body in (b"{", b"[1]", b"\xff"):
        with pytest.raises(ServingError) as info:
            bodies.parse_infer(body, None)
        assert info.value.code == Code.INVALID_ARGUMENT


def test_infer_response_json_and_binary():
    result = PredictResult("m", 3, "serving_default", {"y": np.array([[0.5], [1.5]], np.float32)})
    request = bodies.parse_infer(orjson.dumps({"id": "7", "inputs": []}), None)
    body, length = bodies.encode_infer(result, request)
    assert length is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "3",
        "id": "7",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 1.5]}],
    }
    request = bodies.parse_infer(orjson.dumps({"inputs": [], "parameters": {"binary_data_output": True}}), None)
    body, length = bodies.encode_infer(result, request)
    assert orjson.loads(body[:length])["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2, 1], "parameters": {"binary_data_size": 8}}
    ]
    assert body[length:] == np.array([0.5, 1.5], np.float32).tobytes()


# -- model specs and input checks -------------------------------------------------------------------------


def test_model_specs():
    assert inference.model_spec("m", "", {}) == ModelSpec("m")
    assert inference.model_spec("m", "12", {"signature_name": "s"}) == ModelSpec("m", 12, signature_name="s")
    assert inference.model_spec("m", "stable", {}) == ModelSpec("m", label="stable")
    with pytest.raises(ServingError, match="invalid model version 9223372036854775808"):
        inference.model_spec("m", str(2**63), {})
    with pytest.raises(ServingError, match="parameter 'signature_name' must be a string"):
        inference.model_spec("m", "", {"signature_name": 3})


def test_inputs_are_checked_against_the_signature():
    signature = signature_def(x=1, n=9)  # x: DT_FLOAT, n: DT_INT64
    tensor = inference.InputTensor
    arrays = inference.decode_inputs(
        signature, [tensor("x", "FP32", [2], [1, 2], "json"), tensor("n", "INT64", [1], struct.pack("<q", 5), "raw")], 0
    )
    assert arrays["x"].tolist() == [1.0, 2.0] and arrays["n"].tolist() == [5]
    with pytest.raises(ServingError, match="input 'x' has datatype FP64; the model expects FP32"):
        inference.decode_inputs(signature, [tensor("x", "FP64", [1], [1], "json")], 0)
    with pytest.raises(ServingError, match="input 'x' appears more than once"):
        inference.decode_inputs(signature, [tensor("x", "FP32", [1], [1], "json")] * 2, 0)
    with pytest.raises(ServingError, match=r"--max_decoded_tensor_bytes"):
        inference.decode_inputs(signature, [tensor("x", "FP32", [1000], [0] * 1000, "json")], 1000)

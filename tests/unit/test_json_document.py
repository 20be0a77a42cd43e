"""REST JSON documents: rapidjson's parse rules and messages, debug rendering, error bodies."""

from __future__ import annotations

import math

import pytest

from pyserving.errors import Code, ServingError
from pyserving.protocols.tfs.json.document import (
    debug_string,
    decode_b64,
    encode_error,
    is_b64,
    json_type,
    parse_object,
    signature_name,
)


def _error(call, *args) -> ServingError:
    with pytest.raises(ServingError) as info:
        call(*args)
    assert info.value.code == Code.INVALID_ARGUMENT
    return info.value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "JSON Parse error: The document is empty"),
        (b"nope", "JSON Parse error: Invalid value. at offset: 0"),
        (b"{", "JSON Parse error: Missing a name for object member. at offset: 1"),
        (b'{"a" 1}', "JSON Parse error: Missing a colon after a name of object member. at offset: 5"),
        (b'{"instances": [1.0, 2', "JSON Parse error: Missing a comma or ']' after an array element. at offset: 21"),
        (b'{"a": 1 "b": 2}', "JSON Parse error: Missing a comma or '}' after an object member. at offset: 8"),
        (b'{"a": "x', "JSON Parse error: Missing a closing quotation mark in string. at offset: 8"),
        (b'{"a": "\\q"}', "JSON Parse error: Invalid escape character in string. at offset: 7"),
        (b'{"instances": [1e999999]}', "JSON Parse error: Number too big to be stored in double. at offset: 15"),
        (b"[1, 2]", "JSON Value: [\n    1,\n    2\n] Is not object"),
        (b"3", "JSON Value: 3 Is not object"),
    ],
)
def test_parse_errors_carry_rapidjson_messages_and_byte_offsets(body, message):
    assert _error(parse_object, body).message == message


def test_parse_accepts_nan_and_infinity_and_ignores_trailing_data():
    doc = parse_object(b'{"x": [NaN, Infinity, -Infinity]} trailing')
    assert math.isnan(doc["x"][0])
    assert doc["x"][1:] == [math.inf, -math.inf]


def test_parse_keeps_invalid_utf8_as_surrogates_rather_than_failing():
    doc = parse_object(b'{"k\xff": 1, "inputs": [1]}')
    assert set(doc) == {"k\udcff", "inputs"}


def test_signature_name_must_be_a_string():
    assert signature_name({"signature_name": "s"}) == "s"
    assert signature_name({}) == ""
    message = _error(signature_name, {"signature_name": 3}).message
    assert message == (
        'JSON Value: {\n    "signature_name": 3\n} not formatted correctly. '
        "'signature_name' key must be a string value."
    )


def test_debug_string_is_pretty_json_cut_at_256_bytes():
    assert debug_string({"a": [1, 2.5, True, None]}) == (
        '{\n    "a": [\n        1,\n        2.5,\n        true,\n        null\n    ]\n}'
    )
    assert debug_string(0.1) == "0.1"
    long = debug_string(["x" * 300])
    assert len(long.encode()) == 256 and long.startswith('[\n    "xxx')


@pytest.mark.parametrize(
    ("value", "name"),
    [(None, "Null"), (True, "True"), (False, "False"), ({}, "Object"), ([], "Array"), ("s", "String"), (1.5, "Number")],
)
def test_json_type_names(value, name):
    assert json_type(value) == name


def test_b64_objects():
    assert is_b64({"b64": "aGk="}) and not is_b64({"b64": "aGk=", "x": 1}) and not is_b64({"b64": 1})
    assert decode_b64({"b64": "aGk="}) == b"hi"
    assert _error(decode_b64, {"b64": "!!"}).message == "Unable to base64 decode"
    assert _error(decode_b64, {"x": 1}).message == (
        'JSON Value: {\n    "x": 1\n} not formatted correctly for base64 data'
    )


def test_error_body_layout():
    assert encode_error('bad "x"\n') == b'{\n    "error": "bad \\"x\\"\\n"\n}'
    assert encode_error("\x01") == b'{\n    "error": "\\u0001"\n}'  # rapidjson writes uppercase hex


@pytest.mark.parametrize("depth", [1024, 5000, 100_000])
@pytest.mark.parametrize("leaf", ["1", "NaN"])  # NaN takes the lenient parser
def test_deep_nesting_is_refused_the_same_way_on_every_python(depth, leaf):
    body = ('{"instances": ' + "[" * depth + leaf + "]" * depth + "}").encode()
    assert _error(parse_object, body).message == (
        "JSON Parse error: Terminate parsing due to Handler error. at offset: 0"
    )

"""REST JSON documents: rapidjson's parse rules and messages, debug rendering, error bodies."""

from __future__ import annotations

import math

import numpy as np
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
        (b"[1, 2]", "JSON Value: [1, 2] Is not object"),
        (b'{"a": "\\uZZZZ"}', "JSON Parse error: Incorrect hex digit after \\u escape in string. at offset: 7"),
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


def test_debug_string_is_rapidjsons_pretty_writer_with_single_line_arrays():
    assert debug_string({"a": [1, 2.5, True, None]}) == '{\n    "a": [1, 2.5, true, null]\n}'
    assert debug_string(0.1) == "0.1"
    assert debug_string([[1, 2], [], {}, [{"b64": "aGk="}]]) == (
        '[[1, 2], [], {}, [{\n            "b64": "aGk="\n        }]]'
    )
    doc = {"instances": [[1.0, 2.0]], "inputs": {"x": [1.0], "s": "t"}, "signature_name": None}
    assert debug_string(doc) == (
        '{\n    "instances": [[1.0, 2.0]],\n    "inputs": {\n        "x": [1.0],\n        "s": "t"\n    },\n'
        '    "signature_name": null\n}'
    )


def test_debug_string_takes_tokens_until_256_bytes_are_written():
    """JsonWriterWithLimit: a token starts only while fewer than 256 bytes are out, and is written whole."""
    long = debug_string(["x" * 300, 1])
    assert long == '["' + "x" * 300 + '"'
    numbers = debug_string(list(range(100)))
    assert numbers == "[" + ", ".join(str(i) for i in range(67))
    assert len(numbers.encode()) == 257
    deep: object = 1.0
    for _ in range(1023):
        deep = [deep]
    assert debug_string({"signature_name": deep}) == '{\n    "signature_name": ' + "[" * 232


def test_debug_string_of_numeric_arrays():
    assert debug_string({"instances": np.arange(4.0).reshape(2, 2), "n": np.int64(3)}) == (
        '{\n    "instances": [[0.0, 1.0], [2.0, 3.0]],\n    "n": 3\n}'
    )


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


@pytest.mark.parametrize(
    ("body", "offset"),
    [
        (rb'{"instances": ["\ud800"]}', 16),  # a high surrogate alone
        (rb'{"instances": ["ok", "\uDBFF\u0041"]}', 22),  # followed by an escape that is not a low one
        (rb'{"instances": ["\ud800\n"]}', 16),
        (rb'{"\ud800": 1}', 2),  # in a key
        (rb'{"instances": ["\udc00", "\ud800"]} ', 26),  # after a lone low one (which rapidjson 1.1.0 takes)
        (b'{"instances": ["\xff\\ud800"]}', 17),  # offsets count bytes, invalid UTF-8 included
    ],
)
def test_lone_high_surrogates_get_rapidjsons_error_at_the_escapes_backslash(body, offset):
    assert _error(parse_object, body).message == (
        f"JSON Parse error: The surrogate pair in string is invalid. at offset: {offset}"
    )


def test_surrogate_escapes_as_rapidjson_reads_them():
    doc = parse_object(rb'{"a": ["\ud83d\ude00", "\udc00", "\udcff!", "\\ud800"], "b": NaN}')
    as_bytes = [value.encode("utf-8", "surrogateescape") for value in doc["a"]]
    # A pair is one character; a lone low surrogate becomes the three bytes rapidjson writes for it.
    assert as_bytes == ["😀".encode(), b"\xed\xb0\x80", b"\xed\xb3\xbf!", b"\\ud800"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # rapidjson stops at the first error: an earlier syntax error wins, trailing data is never read.
        (rb'{"a": [1 2], "b": "\ud800"}', "Missing a comma or ']' after an array element. at offset: 9"),
        (rb'{"a": "\ud800", "b": [1 2]}', "The surrogate pair in string is invalid. at offset: 7"),
        (rb'{"a": "\ud800\uZZZZ"}', "Incorrect hex digit after \\u escape in string. at offset: 7"),
    ],
)
def test_surrogate_errors_in_document_order(body, message):
    assert _error(parse_object, body).message == f"JSON Parse error: {message}"
    assert parse_object(rb'{"a": 1} "\ud800"') == {"a": 1}


def _digits(count: int, lead: str = "1") -> str:
    return lead + "0" * (count - 1)


@pytest.mark.parametrize(
    ("number", "prefix"),
    [
        (_digits(310), '{"instances": ['),
        ("-" + _digits(310), '{"instances": [1, '),
        ("9" * 5000, '{"inputs": {"x": ['),  # beyond Python's 4,300-digit conversion limit
        (_digits(309, "2"), '{"s": "' + _digits(309, "2") + '", "examples": [{"x": '),  # the string does not count
        (_digits(400) + ".5", '{"instances": ['),
        ("1e400", '{"instances": [NaN, '),
    ],
)
def test_numbers_beyond_double_are_too_big_where_they_start(number, prefix):
    body = (prefix + number + "]}").encode()
    assert _error(parse_object, body).message == (
        f"JSON Parse error: Number too big to be stored in double. at offset: {len(prefix)}"
    )


def test_big_integers_that_rapidjson_takes_become_doubles():
    numbers = ["NaN", _digits(309), str(2**64 - 1), str(-(2**63)), _digits(25)]
    doc = parse_object(('{"x": [' + ", ".join(numbers) + "]}").encode())  # NaN: Python's json, not orjson
    assert doc["x"][1:] == [1e308, 2**64 - 1, -(2**63), 1e24]
    assert [type(v) for v in doc["x"][1:]] == [float, int, int, float]

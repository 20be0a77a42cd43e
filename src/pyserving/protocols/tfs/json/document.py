"""JSON documents as TF Serving reads and writes them (rapidjson's rules and messages).

Parsing accepts NaN and Infinity and ignores trailing data, as rapidjson's
kParseNanAndInfFlag does; errors carry rapidjson's messages and byte offsets.
`debug_string` is TF's JsonValueToString (pretty JSON cut at 256 bytes), which
TF Serving's messages quote; `encode_error` is its `{"error": ...}` body.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
import orjson

from pyserving.errors import invalid_argument
from pyserving.protocols.tfs.json.writer import PrettyWriter, format_double, format_float32, json_string

__all__ = ["debug_string", "decode_b64", "encode_error", "is_b64", "json_type", "parse_object", "signature_name"]

_DEBUG_LIMIT = 256
_TOO_DEEP = "JSON Parse error: Terminate parsing due to Handler error. at offset: 0"


def parse_object(body: bytes) -> dict[str, Any]:
    """Parse a request body as TF Serving does: NaN/Infinity allowed, trailing data ignored.

    Known difference: rapidjson keeps the first of duplicate keys, both parsers here keep the last.
    """
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson stops at 1024 levels
            # Python 3.12+'s json would go deeper and leave the recursion to whatever walks the result.
            raise invalid_argument(_TOO_DEEP) from None
        doc = _parse_lenient(body)
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {debug_string(doc)} Is not object")
    return doc


class _NumberTooBig(Exception):
    def __init__(self, token: str) -> None:
        self.token = token


def _finite_float(token: str) -> float:
    """A JSON number with a fraction or exponent; rapidjson refuses one beyond double range (1e400)."""
    value = float(token)
    if math.isinf(value):
        raise _NumberTooBig(token)
    return value


def _parse_lenient(body: bytes) -> Any:
    text = body.decode("utf-8", "surrogateescape")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        return json.JSONDecoder(parse_float=_finite_float).raw_decode(text, start)[0]
    except json.JSONDecodeError as exc:
        # Python reports an unterminated string where it starts; rapidjson where the input ends.
        position = len(text) if exc.msg.startswith("Unterminated string") else exc.pos
        offset = len(text[:position].encode("utf-8", "surrogateescape"))
        raise invalid_argument(f"JSON Parse error: {_rapidjson_error(exc, text)} at offset: {offset}") from None
    except _NumberTooBig as exc:
        offset = len(text[: text.find(exc.token)].encode("utf-8", "surrogateescape"))
        raise invalid_argument(
            f"JSON Parse error: Number too big to be stored in double. at offset: {offset}"
        ) from None
    except RecursionError:
        raise invalid_argument(_TOO_DEEP) from None


def _rapidjson_error(exc: json.JSONDecodeError, text: str) -> str:
    msg = exc.msg
    if not text[exc.pos :].strip() and not text.strip():
        return "The document is empty."
    if msg.startswith("Expecting value"):
        return "Invalid value."
    if msg.startswith("Expecting property name"):
        return "Missing a name for object member."
    if msg.startswith("Expecting ':'"):
        return "Missing a colon after a name of object member."
    if msg.startswith("Expecting ','"):
        return (
            "Missing a comma or ']' after an array element."
            if _innermost_open(text, exc.pos) == "["
            else "Missing a comma or '}' after an object member."
        )
    if msg.startswith("Unterminated string"):
        return "Missing a closing quotation mark in string."
    if msg.startswith("Invalid \\escape"):
        return "Invalid escape character in string."
    if msg.startswith("Invalid \\u") or msg.startswith("Invalid \\uXXXX"):
        return "Incorrect hex digit after \\u escape in string."
    if msg.startswith("Invalid control character"):
        return "Invalid encoding in string."
    return "Invalid value."


def _innermost_open(text: str, end: int) -> str:
    stack: list[str] = []
    in_string = escaped = False
    for ch in text[:end]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append(ch)
        elif ch in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else "{"


def signature_name(doc: dict[str, Any]) -> str:
    """The optional `signature_name`; must be a string."""
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(
            f"JSON Value: {debug_string(doc)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return name


def json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _write_value(writer: PrettyWriter, value: Any) -> None:
    if isinstance(value, dict):
        writer.start_object()
        for k, v in value.items():
            writer.key(k)
            _write_value(writer, v)
        writer.end_object()
    elif isinstance(value, list):
        writer.start_array()
        for v in value:
            _write_value(writer, v)
        writer.end_array()
    elif value is None:
        writer.raw("null")
    elif value is True or value is False:
        writer.raw("true" if value else "false")
    elif isinstance(value, int):
        writer.raw(str(value))
    elif isinstance(value, float):
        fits_float = not np.isfinite(value) or float(np.float32(value)) == value
        writer.raw(format_float32(value) if fits_float else format_double(value))
    else:
        writer.raw(json_string(value))


def debug_string(value: Any) -> str:
    """TF's JsonValueToString: pretty JSON of a value, cut at 256 bytes."""
    writer = PrettyWriter()
    _write_value(writer, value)
    text = writer.getvalue()
    return text[:_DEBUG_LIMIT].decode("utf-8", "ignore")


def is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_b64(value: Any) -> bytes:
    if not is_b64(value):
        raise invalid_argument(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    try:
        return base64.b64decode(value["b64"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise invalid_argument("Unable to base64 decode") from None


def encode_error(message: str) -> bytes:
    writer = PrettyWriter()
    writer.start_object()
    writer.key("error")
    writer.raw(json_string(message))
    writer.end_object()
    return writer.getvalue()

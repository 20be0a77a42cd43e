"""JSON documents as TF Serving reads and writes them (rapidjson's rules and messages).

Parsing accepts NaN and Infinity and ignores trailing data, as rapidjson's
kParseNanAndInfFlag does; errors carry rapidjson's messages and byte offsets.
`debug_string` is TF Serving's JsonValueToDebugString (pretty JSON, arrays on one line,
about 256 bytes), which its messages quote; `encode_error` is its `{"error": ...}` body.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from pyserving.errors import invalid_argument
from pyserving.protocols.tfs.json.writer import PrettyWriter, format_double, format_float32, json_string

__all__ = ["debug_string", "decode_b64", "encode_error", "is_b64", "json_type", "parse_object", "signature_name"]

_DEBUG_LIMIT = 256
_FLOAT32_MAX = float(np.finfo(np.float32).max)
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


# rapidjson 1.1.0 (TF Serving's) reads an integer beyond 64 bits as a double, digit by digit
# (d = d * 10 + digit), and refuses the number once d reaches this before another digit.
_DOUBLE_LIMIT = 1.7976931348623157e307
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


def _too_big(digits: str, minus: bool) -> bool:
    """Whether rapidjson refuses an integer part of this many `digits` ("Number too big")."""
    if len(digits) < 309:
        return False
    if len(digits) > 309:
        return True
    limit = 2**63 if minus else _UINT64_MAX
    exact = used = 0
    while exact * 10 + ord(digits[used]) - 48 <= limit:  # the 64-bit part (309 digits never fit)
        exact = exact * 10 + ord(digits[used]) - 48
        used += 1
    value = float(exact)
    for char in digits[used:]:
        if value >= _DOUBLE_LIMIT:
            return True
        value = value * 10 + (ord(char) - 48)
    return False


def _integer(token: str) -> int | float:
    """A JSON integer as rapidjson holds it: int64/uint64, else a double; too big (and never
    converted, so Python's 4,300-digit limit cannot apply) as rapidjson refuses it."""
    minus = token[0] == "-"
    if len(token) - minus < 19:
        return int(token)
    if _too_big(token[minus:], minus):
        raise _NumberTooBig(token)
    value = int(token)
    return value if _INT64_MIN <= value <= _UINT64_MAX else float(token)


def _finite_float(token: str) -> float:
    """A JSON number with a fraction or exponent; rapidjson refuses one beyond double range (1e400)."""
    if len(token) > 309:
        minus = token[0] == "-"
        if _too_big(re.split("[.eE]", token[minus:], maxsplit=1)[0], minus):
            raise _NumberTooBig(token)
    value = float(token)
    if math.isinf(value):
        raise _NumberTooBig(token)
    return value


def _parse_lenient(body: bytes) -> Any:
    original = body.decode("utf-8", "surrogateescape")
    text, moved, surrogate_error = _surrogate_escapes(original) if "\\u" in original else (original, [], None)

    def at(index: int) -> int:
        """An index into `text` as one into `original` (each replaced escape was 3 characters longer)."""
        return index + 3 * bisect.bisect_left(moved, index)

    start = len(text) - len(text.lstrip(" \t\n\r"))
    error: tuple[int, str] | None = None
    try:
        doc, end = json.JSONDecoder(parse_float=_finite_float, parse_int=_integer).raw_decode(text, start)
    except json.JSONDecodeError as exc:
        error = (at(_error_index(exc, text)), _rapidjson_error(exc, text))
        end = len(text)
    except _NumberTooBig as exc:
        error = (at(_number_index(text, exc.token)), "Number too big to be stored in double.")
        end = len(text)
    except RecursionError:
        raise invalid_argument(_TOO_DEEP) from None
    # rapidjson stops at the first error in the text; past the document's end (trailing data) there is none.
    if surrogate_error is not None and surrogate_error[0] < (error[0] if error else at(end)):
        error = surrogate_error
    if error is not None:
        offset = len(original[: error[0]].encode("utf-8", "surrogateescape"))
        raise invalid_argument(f"JSON Parse error: {error[1]} at offset: {offset}")
    return doc


# A \\u escape of a UTF-16 surrogate (an even run of backslashes before it escapes only themselves).
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})")
_HEX_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}")


def _surrogate_escapes(text: str) -> tuple[str, list[int], tuple[int, str] | None]:
    """rapidjson 1.1.0's reading of surrogate escapes, which Python's json takes as they come.

    A high surrogate must be followed by an escaped low one; else rapidjson stops at the first
    backslash: (index, message). A lone low surrogate is kept as the three bytes rapidjson writes
    for it (ED B0 80 for \\udc00); the escape is replaced by the surrogateescape characters of those
    bytes, so a string's bytes come out as TF Serving's. Returns the text, the indices (in the
    returned text) of the replacements, and the first error (its index in `text`).
    """
    parts: list[str] = []
    moved: list[int] = []
    done = position = length = 0
    while (match := _SURROGATE_ESCAPE.search(text, position)) is not None:
        escape, position = match.end() - 6, match.end()
        code = int(match.group(1), 16)
        if code <= 0xDBFF:
            following = text[position : position + 6]
            if _HEX_ESCAPE.fullmatch(following) and 0xDC00 <= int(following[2:], 16) <= 0xDFFF:
                position += 6
                continue
            message = (
                "Incorrect hex digit after \\u escape in string."
                if following.startswith("\\u") and not _HEX_ESCAPE.fullmatch(following)
                else "The surrogate pair in string is invalid."
            )
            parts.append(text[done:])
            return "".join(parts), moved, (escape, message)
        parts.append(text[done:escape])
        length += escape - done
        moved.append(length)
        parts.append(chr(code).encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape"))
        length += 3
        done = position
    parts.append(text[done:])
    return "".join(parts), moved, None


def _error_index(exc: json.JSONDecodeError, text: str) -> int:
    """Where rapidjson reports Python's error: the end of the input for an unterminated string,
    the backslash (not the `u`) of a bad \\u escape."""
    if exc.msg.startswith("Unterminated string"):
        return len(text)
    if exc.msg.startswith("Invalid \\u"):
        return exc.pos - 1
    return exc.pos


# JSON strings (skipped) and numbers, to find the number Python's json refused.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?', re.DOTALL)


def _number_index(text: str, token: str) -> int:
    """Where the first number `token` stands outside strings (the first too big is the one refused)."""
    for match in _TOKENS.finditer(text):
        if match.group() == token:
            return match.start()
    return max(text.find(token), 0)


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


class _Key(str):
    """An object member's name in `_events`."""


_END_OBJECT, _END_ARRAY = object(), object()


def _events(value: Any) -> Iterator[Any]:
    """The value as rapidjson's writer events, depth first without recursion (values nest up to 1,024
    levels): containers' starts (the container itself), `_Key`s, scalars and the two end markers."""
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack:
        item = next(stack[-1], stack)  # the stack itself marks an exhausted iterator
        if item is stack:
            stack.pop()
        elif isinstance(item, dict):
            yield item
            stack.append(itertools.chain(*((_Key(k), v) for k, v in item.items()), (_END_OBJECT,)))
        elif isinstance(item, list) or (isinstance(item, np.ndarray) and item.ndim):
            yield item
            stack.append(itertools.chain(item, (_END_ARRAY,)))
        else:
            yield item


def _write_event(writer: PrettyWriter, event: Any) -> None:
    if event is _END_OBJECT:
        writer.end_object()
    elif event is _END_ARRAY:
        writer.end_array()
    elif isinstance(event, _Key):
        writer.key(event)
    elif isinstance(event, dict):
        writer.start_object()
    elif isinstance(event, list) or (isinstance(event, np.ndarray) and event.ndim):
        writer.start_array()
    else:
        writer.raw(_scalar_text(event.item() if isinstance(event, (np.generic, np.ndarray)) else event))


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        fits_float = not math.isfinite(value) or (abs(value) <= _FLOAT32_MAX and float(np.float32(value)) == value)
        return format_float32(value) if fits_float else format_double(value)
    return json_string(value)


def debug_string(value: Any) -> str:
    """TF Serving's JsonValueToDebugString: a PrettyWriter with single-line arrays that takes each next
    token (with its separator and indent) only while it has written fewer than 256 bytes."""
    writer = PrettyWriter()
    writer.single_line = True
    size = written = 0
    for event in _events(value):
        if size >= _DEBUG_LIMIT:
            break
        _write_event(writer, event)
        size += sum(len(part.encode("utf-8", "surrogateescape")) for part in writer.parts[written:])
        written = len(writer.parts)
    return writer.getvalue().decode("utf-8", "surrogateescape")


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

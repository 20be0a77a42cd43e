"""Predict bodies whose tensors are regular numeric arrays, decoded without a Python object per number.

orjson turns `[[[0.1], [0.2], ...]]` into nested lists of floats that numpy then walks a
second time, and freeing them costs a third pass: for a 28x28 image that was most of a
request's time on the event loop. Here simdjson parses the body and copies each numeric
array straight into a flat buffer. The array's shape is read from its first elements and
proved regular by comparing the body's brackets, braces and commas with those that a
regular array of that shape has (a JSON array with n - 1 commas holds n elements, and the
element count settles arrays of one). Anything this cannot prove (strings, booleans, nulls
or objects inside arrays, ragged arrays, NaN, duplicate keys, unknown keys, integers that
float64 would round) gives None, and the caller takes the general path, which keeps TF
Serving's exact results and error messages.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import simdjson

__all__ = ["parse"]

_STRUCTURE = b"[]{},"
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in _STRUCTURE)
_TENSOR_KEYS = ("instances", "inputs")
# float64 holds every integer up to here exactly, so an integer sent as a float reads back unchanged.
_EXACT_INTEGERS = 2.0**53
_REUSED_PARSER_BYTES = 1 << 20
_local = threading.local()


def parse(body: bytes) -> dict[str, Any] | None:
    """The body as a dict whose `instances` / `inputs` tensors are numpy arrays (int64 or float64), or None."""
    parser = getattr(_local, "parser", None)
    if len(body) > _REUSED_PARSER_BYTES:  # a parser keeps buffers sized for the largest document it saw
        parser = simdjson.Parser()
    elif parser is None:
        parser = _local.parser = simdjson.Parser()
    try:
        doc = parser.parse(body)
    except Exception:  # invalid JSON, NaN, invalid UTF-8, ...: the general parser reports it
        return None
    try:
        return _convert(doc, body)
    except Exception:  # e.g. simdjson cannot look up a key holding U+0000
        return None
    finally:
        del doc  # a parser is reusable only once no proxy into its last document is alive


def _convert(doc: Any, body: bytes) -> dict[str, Any] | None:
    if not isinstance(doc, simdjson.Object):
        return None
    result: dict[str, Any] = {}
    parts: list[bytes] = []  # each member's structure characters, in body order
    part: bytes | None
    for key in doc.keys():
        value = doc[key]
        if key in result or _has_structure(key):
            return None
        if key == "signature_name" and isinstance(value, str) and not _has_structure(value):
            result[key], part = value, b""
        elif key in _TENSOR_KEYS and isinstance(value, simdjson.Array):
            result[key], part = _tensor(value)
        elif key == "inputs" and isinstance(value, simdjson.Object):
            result[key], part = _named_tensors(value)
        else:
            return None
        if part is None:
            return None
        parts.append(part)
    if len(result.keys() & _TENSOR_KEYS) != 1:
        return None
    if body.translate(None, _NOT_STRUCTURE) != b"{" + b",".join(parts) + b"}":
        return None
    return result


def _named_tensors(inputs: Any) -> tuple[dict[str, np.ndarray | None] | None, bytes | None]:
    tensors: dict[str, np.ndarray | None] = {}
    parts: list[bytes] = []
    for name in inputs.keys():
        value = inputs[name]
        if name in tensors or _has_structure(name) or not isinstance(value, simdjson.Array):
            return None, None
        tensors[name], part = _tensor(value)
        if part is None:
            return None, None
        parts.append(part)
    return tensors, b"{" + b",".join(parts) + b"}"


def _tensor(array: Any) -> tuple[np.ndarray | None, bytes | None]:
    """The array as a tensor and the structure characters a regular array of its shape has."""
    shape: list[int] = []
    first = array
    while isinstance(first, simdjson.Array):
        if len(first) == 0:
            return None, None
        shape.append(len(first))
        first = first[0]
    if type(first) not in (int, float):
        return None, None
    flat = _numbers(array, type(first) is int)
    if flat is None or flat.size != math.prod(shape):
        return None, None
    return flat.reshape(shape), _regular_structure(shape)


def _numbers(array: Any, first_is_integer: bool) -> np.ndarray | None:
    """All numbers in the (possibly nested) array, flattened: int64 if all are integers, else float64."""
    if first_is_integer:
        try:
            return np.frombuffer(array.as_buffer(of_type="i"), dtype=np.int64)
        except Exception:  # not all integers (or one beyond int64)
            pass
    try:
        flat = np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
    except Exception:  # a string, boolean, null or object
        return None
    # An integer beyond 2**53 (say uint64) would be rounded here; the general path converts it exactly.
    return flat if flat.size == 0 or np.abs(flat).max() < _EXACT_INTEGERS else None


def _regular_structure(shape: list[int]) -> bytes:
    text = b"[" + b"," * (shape[-1] - 1) + b"]"
    for size in reversed(shape[:-1]):
        text = b"[" + b",".join([text] * size) + b"]"
    return text


def _has_structure(text: str) -> bool:
    return any(c in text for c in "[]{},")

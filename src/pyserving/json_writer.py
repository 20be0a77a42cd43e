"""Byte-exact emulation of the rapidjson PrettyWriter output TF Serving produces.

TF Serving writes every REST response with a 4-space PrettyWriter and switches
to single-line arrays inside row-format items, which yields layouts such as
`{\n    "predictions": [3.0, 3.5, 4.0\n    ]\n}`. Clients may compare bytes,
so the writer reproduces the same prefixes, separators and indentation.
Numbers are formatted by `format_floats` (TF's `%.6g`, else `%.9g`/`%.17g`,
then `.0`), vectorised over numpy arrays.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import orjson

_INDENT = "    "


class PrettyWriter:
    """A minimal rapidjson PrettyWriter: values are pre-rendered JSON text fragments."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.single_line = False
        self._stack: list[list] = []  # [in_array, value_count]

    def _prefix(self) -> None:
        if not self._stack:
            return
        level = self._stack[-1]
        out = self.parts
        if level[0]:
            if level[1] > 0:
                out.append(", " if self.single_line else ",")
            if not self.single_line:
                out.append("\n" + _INDENT * len(self._stack))
        else:
            if level[1] > 0:
                out.append(",\n" if level[1] % 2 == 0 else ": ")
            else:
                out.append("\n")
            if level[1] % 2 == 0:
                out.append(_INDENT * len(self._stack))
        level[1] += 1

    def raw(self, text: str) -> None:
        self._prefix()
        self.parts.append(text)

    def raw_run(self, texts: list[str]) -> None:
        """Several scalar values in a row inside the current array (fast path)."""
        if not texts:
            return
        if len(texts) == 1 or not self._stack or not self._stack[-1][0]:
            for t in texts:
                self.raw(t)
            return
        self._prefix()
        sep = ", " if self.single_line else ",\n" + _INDENT * len(self._stack)
        self.parts.append(sep.join(texts))
        self._stack[-1][1] += len(texts) - 1

    def key(self, name: str) -> None:
        self.raw(json_string(name))

    def start_object(self) -> None:
        self._prefix()
        self.parts.append("{")
        self._stack.append([False, 0])

    def end_object(self) -> None:
        empty = self._stack.pop()[1] == 0
        if not empty:
            self.parts.append("\n" + _INDENT * len(self._stack))
        self.parts.append("}")

    def start_array(self) -> None:
        self._prefix()
        self.parts.append("[")
        self._stack.append([True, 0])

    def end_array(self) -> None:
        empty = self._stack.pop()[1] == 0
        if not empty and not self.single_line:
            self.parts.append("\n" + _INDENT * len(self._stack))
        self.parts.append("]")

    def getvalue(self) -> bytes:
        return "".join(self.parts).encode("utf-8", "surrogateescape")


def json_string(text: str) -> str:
    """A JSON string literal escaped like rapidjson (non-ASCII and '/' left as is)."""
    if _RARE_CONTROL.search(text) is None:
        try:
            return orjson.dumps(text).decode()
        except TypeError:  # lone surrogates stand for raw bytes that were not UTF-8
            pass
    return _escape_slow(text)


# orjson writes these as lowercase \u00xx, rapidjson as uppercase.
_RARE_CONTROL = re.compile("[\x00-\x07\x0b\x0e-\x1f]")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_slow(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " ":
            out.append("\\u%04X" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def bytes_string(value: bytes) -> str:
    """A DT_STRING element as TF writes it: the raw bytes, invalid UTF-8 left unescaped."""
    return json_string(value.decode("utf-8", "surrogateescape"))


def b64_object(value: bytes, writer: PrettyWriter) -> None:
    writer.start_object()
    writer.key("b64")
    writer.raw(json_string(base64.b64encode(value).decode("ascii")))
    writer.end_object()


def format_floats(values: np.ndarray) -> list[str]:
    """TF Serving's WriteDecimal for a flat float32/float64 array."""
    flat = values.ravel()
    py = flat.tolist()
    short = list(map("%.6g".__mod__, py))
    finite = np.isfinite(flat)
    if flat.dtype == np.float64:
        long_fmt, back = "%.17g", np.array(short, dtype=np.float64)
    else:
        long_fmt, back = "%.9g", np.array(short, dtype=np.float64).astype(np.float32)
    with np.errstate(invalid="ignore"):
        redo = np.flatnonzero(finite & (back != flat))
    for i in redo.tolist():
        short[i] = long_fmt % py[i]
    for i in np.flatnonzero(~finite).tolist():
        v = py[i]
        short[i] = "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    finite_idx = finite.tolist()
    return [s + ".0" if ok and "." not in s and "e" not in s else s for s, ok in zip(short, finite_idx)]


def format_double(value: float) -> str:
    """WriteDecimal for one Python float (double precision)."""
    return format_floats(np.array([value], dtype=np.float64))[0]


def format_float32(value: float) -> str:
    return format_floats(np.array([value], dtype=np.float32))[0]

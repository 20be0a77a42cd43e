"""Byte-exact emulation of the rapidjson PrettyWriter output TF Serving produces.

TF Serving writes every REST response with a 4-space PrettyWriter and switches
to single-line arrays inside row-format items, which yields layouts such as
`{\n    "predictions": [3.0, 3.5, 4.0\n    ]\n}`. Clients may compare bytes,
so the writer reproduces the same prefixes, separators and indentation.
Numbers are formatted by `format_floats` (TF's `%.6g`, else `%.9g`/`%.17g`,
then `.0`): value by value, or vectorised for large float32 arrays.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import Iterator

import numpy as np
import orjson

__all__ = [
    "CsvRun",
    "PrettyWriter",
    "b64_object",
    "bytes_string",
    "format_double",
    "format_float32",
    "format_floats",
    "json_string",
]

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

    def raw_run(self, texts: list[str] | CsvRun) -> None:
        """Several scalar values in a row inside the current array (fast path)."""
        if not len(texts):
            return
        if len(texts) == 1 or not self._stack or not self._stack[-1][0]:
            for t in texts:
                self.raw(t)
            return
        self._prefix()
        sep = ", " if self.single_line else ",\n" + _INDENT * len(self._stack)
        self.parts.append(texts.joined(sep) if isinstance(texts, CsvRun) else sep.join(texts))
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


class CsvRun:
    """Rendered values kept as one comma-separated text, so a whole run is written without
    making a string per value; slicing (rows of a larger tensor) splits it once."""

    __slots__ = ("_csv", "_count", "_texts")

    def __init__(self, csv: str, count: int) -> None:
        self._csv, self._count = csv, count
        self._texts: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, part: slice) -> CsvRun | list[str]:
        if isinstance(part, slice) and part.indices(self._count) == (0, self._count, 1):
            return self
        return self.texts()[part]

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts())

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = self._csv.split(",")
        return self._texts

    def joined(self, sep: str) -> str:
        return self._csv.replace(",", sep)


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


# Below this many float32 values, formatting one by one beats the vectorised path's numpy overhead.
_SMALL_RUN = 32
_FLOAT32 = struct.Struct("f")


def format_floats(values: np.ndarray) -> list[str] | CsvRun:
    """TF Serving's WriteDecimal for a flat float32/float64 array."""
    flat = values.ravel()
    if flat.dtype == np.float32 and flat.size > _SMALL_RUN:
        return _format_float32(flat)
    single = flat.dtype == np.float32
    return [_format_one(v, single) for v in flat.tolist()]


def _format_float32(flat: np.ndarray) -> CsvRun:
    """`format_floats` for a large float32 array without formatting values one by one.

    For 1e-4 <= |x| < 1e9, `%.6g` / `%.9g` print fixed notation, so TF's text is the
    decimal those round to, trailing zeros dropped, `.0` added to integers. That decimal
    is computed exactly in float64 (x * 10^k needs at most 24 + 28 bits for k <= 12) and
    orjson prints a float64 holding it as exactly those digits (its shortest round trip).
    Zeros print as orjson does too; the rest (tiny, huge, NaN, inf) take `_format_one`.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # NaNs and infinities take the slow path
        x = flat.astype(np.float64)
        a = np.abs(x)
        in_range = (a >= 1e-4) & (a < 1e9)
        e = np.floor(np.log10(np.where(in_range, a, 1.0)))
        e += a >= 10.0 ** (e + 1)  # log10 rounding at exact powers of ten
        e -= a < 10.0**e
        scale6 = 10.0 ** np.clip(5 - e, 0, 9)
        six = np.rint(a * scale6) / scale6
        six_exact = six.astype(np.float32) == a.astype(np.float32)
    fast = in_range & ~(six_exact & (a >= 1e6))  # %.6g prints 1e+06 and up in scientific notation
    scale9 = 10.0 ** np.clip(8 - e, 0, 12)
    decimal = np.where(six_exact, six, np.rint(a * scale9) / scale9)
    decimal = np.where(fast, np.copysign(decimal, x), x)
    # The slow values are formatted one by one between runs of fast ones printed in bulk.
    pieces, start = [], 0
    for i in np.flatnonzero(~fast & (a != 0)).tolist():
        if i > start:
            pieces.append(_csv(decimal[start:i]))
        pieces.append(_format_one(float(x[i]), True))
        start = i + 1
    if start < flat.size:
        pieces.append(_csv(decimal[start:]))
    return CsvRun(",".join(pieces), flat.size)


def _csv(values: np.ndarray) -> str:
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY).decode()[1:-1]


def _format_one(value: float, single: bool) -> str:
    """TF's WriteDecimal for one value: `%.6g` if it reads back exactly, else `%.9g` (float32) or
    `%.17g` (float64); `.0` added when the text has neither a point nor an exponent."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    text = "%.6g" % value
    if single:
        try:
            exact = _FLOAT32.unpack(_FLOAT32.pack(float(text)))[0] == value
        except OverflowError:
            exact = False
        if not exact:
            text = "%.9g" % value
    elif float(text) != value:
        text = "%.17g" % value
    return text if "." in text or "e" in text else text + ".0"


def format_double(value: float) -> str:
    """WriteDecimal for one Python float (double precision)."""
    return _format_one(value, False)


def format_float32(value: float) -> str:
    """WriteDecimal for a Python float that float32 holds exactly."""
    return _format_one(value, True)

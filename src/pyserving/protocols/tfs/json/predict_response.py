"""Predict outputs to TF Serving's REST response body, byte for byte (rapidjson's PrettyWriter layout).

Row format (`instances` requests) writes `{"predictions": [...]}` with each row's
arrays on one line; columnar (`inputs`) writes `{"outputs": ...}`. String outputs
whose alias ends in `_bytes` become `{"b64": ...}` objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from pyserving import tensors
from pyserving.errors import invalid_argument
from pyserving.protocols.tfs.json.predict_request import ROW
from pyserving.protocols.tfs.json.writer import CsvRun, PrettyWriter, b64_object, bytes_string, format_floats

__all__ = ["encode_predict", "encoded_size"]

# A tensor's leaves (value texts, or raw bytes for b64 objects) and the function that writes a run of them.
_Leaves = list[Any] | CsvRun
_RunWriter = Callable[[PrettyWriter, Any], None]


def _leaves(array: np.ndarray, name: str) -> tuple[_Leaves, _RunWriter]:
    """Flat leaf items of a tensor and the function that writes a run of them.

    Text leaves are written in bulk; `_bytes` string outputs become `{"b64": ...}` objects.
    """
    kind = array.dtype.kind
    flat = array.ravel()
    if array.dtype == object or kind in "SU":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in flat.tolist()]
        if name.endswith("_bytes"):
            return items, _write_b64_run
        return [bytes_string(v) for v in items], PrettyWriter.raw_run
    if array.dtype in (np.float32, np.float64):
        return format_floats(flat), PrettyWriter.raw_run
    if kind == "b":
        return ["true" if v else "false" for v in flat.tolist()], PrettyWriter.raw_run
    if kind in "iu" and array.dtype != np.uint16:
        return list(map(str, flat.tolist())), PrettyWriter.raw_run
    raise invalid_argument(f"Failed to write JSON value for tensor type: {tensors.type_name(tensors.dtype_of(array))}")


def _write_b64_run(writer: PrettyWriter, items: list[bytes]) -> None:
    for item in items:
        b64_object(item, writer)


def _write_nested(writer: PrettyWriter, items: _Leaves, shape: tuple[int, ...], write_run: _RunWriter) -> None:
    """TF's AddTensorValues: nested arrays over `shape`, a bare value for a scalar."""
    if not shape:
        write_run(writer, items[:1])
        return
    writer.start_array()
    if len(shape) == 1:
        write_run(writer, items)
    else:
        step = len(items) // shape[0] if shape[0] else 0
        for i in range(shape[0]):
            _write_nested(writer, items[i * step : (i + 1) * step], shape[1:], write_run)
    writer.end_array()


# Roughly the JSON text of one tensor element (a float is about 10 characters and a separator).
_ENCODED_BYTES_PER_ELEMENT = 16


def encoded_size(outputs: dict[str, np.ndarray]) -> int:
    """An estimate of `encode_predict`'s output size, to decide where to run it."""
    return sum(array.size for array in outputs.values()) * _ENCODED_BYTES_PER_ELEMENT


def _one_output_rows(items: list[str] | CsvRun, shape: tuple[int, ...]) -> bytes:
    """`encode_predict`'s row layout for one output with text leaves, joined without the writer:
    each row a single-line array, the outer array closed on a line of its own."""
    if not shape[0]:
        return b'{\n    "predictions": []\n}'
    if len(shape) > 1:
        rows = ", ".join(_single_line_rows(list(items), shape))
    else:
        rows = items.joined(", ") if isinstance(items, CsvRun) else ", ".join(items)
    return ('{\n    "predictions": [' + rows + "\n    ]\n}").encode("utf-8", "surrogateescape")


def _single_line_rows(items: list[str], shape: tuple[int, ...]) -> list[str]:
    """The texts of the `shape[0]` sub-arrays of `items` (a flat C-order tensor), each on one line."""
    if len(shape) == 1:
        return items
    step = len(items) // shape[0] if shape[0] else 0
    return [
        "[" + ", ".join(_single_line_rows(items[i * step : (i + 1) * step], shape[1:])) + "]" for i in range(shape[0])
    ]


def encode_predict(outputs: dict[str, np.ndarray], fmt: str) -> bytes:
    """The predict response body in TF Serving's layout (`predictions` or `outputs`)."""
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == ROW:
        batch = -1
        for name in names:
            array = outputs[name]
            if array.ndim == 0:
                raise invalid_argument(f"Tensor name: {name} has no shape information ")
            if batch >= 0 and array.shape[0] != batch:
                raise invalid_argument(
                    f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}"
                )
            batch = array.shape[0]
        rows = []  # per output: (name, leaf items, run writer, row shape, leaves per row)
        for name in names:
            inner = outputs[name].shape[1:]
            rows.append((name, *_leaves(outputs[name], name), inner, math.prod(inner)))
        as_objects = len(names) > 1
        if not as_objects and rows[0][2] is PrettyWriter.raw_run:
            return _one_output_rows(rows[0][1], outputs[names[0]].shape)
    writer = PrettyWriter()
    writer.start_object()
    if fmt == ROW:
        writer.key("predictions")
        writer.start_array()
        for item in range(batch):  # several outputs (an object per row), or `_bytes` ones ({"b64": ...})
            if as_objects:
                writer.start_object()
            writer.single_line = True
            for name, items, write_run, inner, per_row in rows:
                if as_objects:
                    writer.key(name)
                _write_nested(writer, items[item * per_row : (item + 1) * per_row], inner, write_run)
            writer.single_line = False
            if as_objects:
                writer.end_object()
        writer.end_array()
    else:
        writer.key("outputs")
        as_objects = len(names) > 1
        if as_objects:
            writer.start_object()
        for name in names:
            if as_objects:
                writer.key(name)
            items, write_run = _leaves(outputs[name], name)
            _write_nested(writer, items, outputs[name].shape, write_run)
        if as_objects:
            writer.end_object()
    writer.end_object()
    return writer.getvalue()

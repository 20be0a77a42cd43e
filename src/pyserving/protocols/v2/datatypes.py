"""V2 tensors <-> numpy: datatype names, raw little-endian bytes, and JSON values.

Raw data is the binary tensor data extension (REST) and `raw_input_contents` /
`raw_output_contents` (gRPC): fixed-size elements little-endian, row-major;
BYTES elements each prefixed by a 4-byte little-endian length. JSON data is a
flat (or nested) list in row-major order. Every function here is proportional to
the tensor's size: callers run them off the event loop for big tensors.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from pyserving import tensors
from pyserving.errors import invalid_argument

__all__ = [
    "BYTES",
    "DATATYPES",
    "check_shape",
    "datatype_of",
    "datatype_of_tf",
    "from_json",
    "from_raw",
    "from_typed",
    "to_json",
    "to_raw",
]

BYTES = "BYTES"
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    BYTES: np.dtype(object),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}
_LENGTH = struct.Struct("<I")
# What one BYTES element costs once decoded besides its bytes (a pointer in the object array).
_POINTER_BYTES = 8


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of an output array (TF strings are object arrays of bytes)."""
    name = _BY_DTYPE.get(array.dtype)
    if name is None:
        if array.dtype.kind in "SU":
            return BYTES
        raise invalid_argument(f"output datatype {array.dtype} has no Open Inference Protocol datatype")
    return name


def datatype_of_tf(dtype: int) -> str:
    """The V2 datatype of a signature's TF DataType; TF's name in capitals for a type V2 lacks (complex)."""
    try:
        return _BY_DTYPE[tensors.numpy_dtype(dtype)]
    except (KeyError, ValueError):
        return tensors.type_name(dtype).upper()


def check_shape(name: str, datatype: str, shape: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
    """(shape, element count, bytes once decoded) of an input, refused when its datatype is unknown, its
    dimensions are not integers >= 0 or its rank is over TF's 64."""
    if datatype not in DATATYPES:
        raise invalid_argument(f"invalid datatype '{datatype}' for input '{name}'")
    if len(shape) > tensors.MAX_RANK:
        raise invalid_argument(f"input '{name}' has {len(shape)} dimensions; at most {tensors.MAX_RANK} are allowed")
    dims = tuple(shape)
    for dim in dims:
        if type(dim) is not int or dim < 0:
            raise invalid_argument(f"input '{name}' has an invalid shape {list(dims)}: dimensions are integers >= 0")
    count = math.prod(dims)
    itemsize = _POINTER_BYTES if datatype == BYTES else DATATYPES[datatype].itemsize
    return dims, count, count * itemsize


def from_raw(name: str, datatype: str, shape: tuple[int, ...], count: int, data: bytes | memoryview) -> np.ndarray:
    """An input from its raw bytes (read-only when it can share them)."""
    if datatype == BYTES:
        return _bytes_elements(name, shape, count, data)
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise invalid_argument(
            f"input '{name}' has {len(data)} bytes of raw data; shape {list(shape)} of {datatype} "
            f"takes {count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        return (np.frombuffer(data, np.uint8) != 0).reshape(shape)
    return np.frombuffer(data, dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _bytes_elements(name: str, shape: tuple[int, ...], count: int, data: bytes | memoryview) -> np.ndarray:
    view = memoryview(data)
    if count * _LENGTH.size > len(view):  # before allocating: each element takes at least its length
        raise invalid_argument(f"input '{name}': {len(view)} bytes of raw BYTES data cannot hold {count} elements")
    out = np.empty(count, dtype=object)
    offset, end = 0, len(view)
    for index in range(count):
        if offset + 4 > end:
            raise invalid_argument(f"input '{name}': raw BYTES data ends before element {index} of {count}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise invalid_argument(f"input '{name}': raw BYTES element {index} is longer than the data left")
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise invalid_argument(f"input '{name}': {end - offset} bytes of raw BYTES data after the {count} elements")
    return out.reshape(shape)


def from_json(name: str, datatype: str, shape: tuple[int, ...], count: int, data: Any) -> np.ndarray:
    """An input from its JSON `data`: a list, flat or nested in row-major order, of numbers (booleans for
    BOOL, strings for BYTES); values must fit the datatype."""
    if not isinstance(data, list):
        data = [data]  # a scalar
    if datatype == BYTES:
        flat = _flatten(data)
        if not all(type(value) is str for value in flat):
            raise invalid_argument(f"input '{name}' of datatype BYTES takes strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = [value.encode() for value in flat]
    else:
        try:
            array = np.asarray(data)
        except (ValueError, OverflowError):
            raise invalid_argument(
                f"input '{name}' data is not a list of numbers with one size along each dimension"
            ) from None
        if array.dtype.kind in "fO" and DATATYPES[datatype].kind in "iu":
            array = _integers(name, datatype, _flatten(data))  # numpy read big ints as floats or objects
        array = _cast(name, datatype, array.ravel())
    if array.size != count:
        raise invalid_argument(
            f"input '{name}' has {array.size} elements in its data; its shape {list(shape)} takes {count}"
        )
    return array.reshape(shape)


def from_typed(name: str, datatype: str, shape: tuple[int, ...], count: int, values: Sequence[Any]) -> np.ndarray:
    """An input from gRPC's typed `contents` field for its datatype (already of the field's type)."""
    if datatype == BYTES:
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
    else:
        array = _cast(name, datatype, np.asarray(values))
    if array.size != count:
        raise invalid_argument(
            f"input '{name}' has {array.size} elements in its contents; its shape {list(shape)} takes {count}"
        )
    return array.reshape(shape)


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _integers(name: str, datatype: str, flat: list[Any]) -> np.ndarray:
    """Python ints that numpy would not read as one integer type together (below and above 2**63)."""
    if not all(type(value) is int for value in flat):
        raise invalid_argument(f"input '{name}' of datatype {datatype} takes integers")
    info = np.iinfo(DATATYPES[datatype])
    if flat and (min(flat) < info.min or max(flat) > info.max):
        raise invalid_argument(f"input '{name}' has a value out of the range of {datatype}")
    return np.array(flat, dtype=DATATYPES[datatype])


def _cast(name: str, datatype: str, array: np.ndarray) -> np.ndarray:
    """`array` (as numpy read it) as `datatype`, refusing values of another kind or out of range."""
    dtype = DATATYPES[datatype]
    kind = array.dtype.kind
    if array.size == 0:
        return array.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise invalid_argument(f"input '{name}' of datatype BOOL takes true and false")
        return array
    if kind not in "iuf" or (kind == "f" and dtype.kind in "iu"):
        what = "integers" if dtype.kind in "iu" else "numbers"
        raise invalid_argument(f"input '{name}' of datatype {datatype} takes {what}")
    if dtype.kind in "iu" and array.dtype != dtype:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise invalid_argument(f"input '{name}' has a value out of the range of {datatype}")
    return array.astype(dtype, copy=False)


def to_raw(array: np.ndarray) -> bytes:
    """An output's raw bytes."""
    if array.dtype == object or array.dtype.kind in "SU":
        parts = []
        for value in array.ravel():
            data = value if isinstance(value, bytes) else str(value).encode()
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def to_json(name: str, array: np.ndarray) -> Any:
    """An output's JSON data: a flat array orjson writes as is, or a list of strings for BYTES."""
    if array.dtype == object or array.dtype.kind == "S":
        try:
            return [value.decode() if isinstance(value, bytes) else str(value) for value in array.ravel()]
        except UnicodeDecodeError:
            raise invalid_argument(
                f"output '{name}' holds bytes that are not UTF-8; request it as binary data"
            ) from None
    if array.dtype == DATATYPES["BF16"]:
        array = array.astype(np.float32)
    return np.ascontiguousarray(array.ravel())

"""TensorProto <-> numpy conversion, done by hand (5x cheaper than tf.make_tensor_proto).

DataType numbers and field names follow tensorflow/core/framework/types.proto.
Strings are numpy object arrays of `bytes`, which is what a TF session takes and returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from pyserving.errors import invalid_argument

__all__ = [
    "MAX_RANK",
    "base_dtype",
    "check_decoded_bytes",
    "checked_shapes",
    "decode",
    "decoded_nbytes",
    "dtype_of",
    "encode_proto",
    "length_delimited",
    "numpy_dtype",
    "to_ndarray",
    "to_ndarrays",
    "to_proto",
    "type_name",
]

_REF_OFFSET = 100
# TensorShape's limits: at most 64 dimensions, and an element count that fits int64.
MAX_RANK = 64
_MAX_ELEMENTS = 2**63 - 1
# What one element of a DT_STRING tensor costs besides its bytes (a pointer in the object array).
_POINTER_BYTES = 8
# More than a 64-bit process can address (48-bit virtual addresses): TF cannot allocate such a tensor,
# so Tensor::FromProto refuses it whatever --max_decoded_tensor_bytes says.
_ADDRESSABLE_BYTES = 2**48

# DataType -> (numpy dtype, TensorProto value field, TF's lowercase type name)
_DTYPES: dict[int, tuple[np.dtype, str, str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val", "float"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val", "double"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val", "int32"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val", "uint8"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val", "int16"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val", "int8"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val", "uint16"),
    types_pb2.DT_STRING: (np.dtype(object), "string_val", "string"),
    types_pb2.DT_COMPLEX64: (np.dtype(np.complex64), "scomplex_val", "complex64"),
    types_pb2.DT_COMPLEX128: (np.dtype(np.complex128), "dcomplex_val", "complex128"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val", "int64"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val", "bool"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val", "half"),
    types_pb2.DT_BFLOAT16: (np.dtype(ml_dtypes.bfloat16), "half_val", "bfloat16"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val", "uint32"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val", "uint64"),
}
_BY_NUMPY = {np_dtype: dt for dt, (np_dtype, _, _) in _DTYPES.items() if np_dtype != np.dtype(object)}
_HALF_BITS = (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)
_COMPLEX = (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128)


def base_dtype(dtype: int) -> int:
    """Strip the `_REF` flag (stateful TF1 outputs such as DT_FLOAT_REF)."""
    return dtype - _REF_OFFSET if dtype > _REF_OFFSET else dtype


def numpy_dtype(dtype: int) -> np.dtype:
    return _DTYPES[base_dtype(dtype)][0]


def type_name(dtype: int) -> str:
    """TF's DataTypeString: `float`, `int32`, `string`, ..."""
    entry = _DTYPES.get(base_dtype(dtype))
    if entry is not None:
        return entry[2]
    return types_pb2.DataType.Name(base_dtype(dtype))[3:].lower()


def dtype_of(array: np.ndarray) -> int:
    """The DataType of a numpy array returned by TensorFlow."""
    if array.dtype == object or array.dtype.kind in "SU":
        return types_pb2.DT_STRING
    try:
        return _BY_NUMPY[array.dtype]
    except KeyError:
        raise invalid_argument(f"Unsupported tensor dtype: {array.dtype}") from None


def to_ndarray(proto: tensor_pb2.TensorProto, name: str) -> np.ndarray:
    """Decode a TensorProto as TF's Tensor::FromProto does (short value lists repeat the last value)."""
    return _decode(proto, name, _checked_shape(proto, name)[0])


def to_ndarrays(protos: Mapping[str, tensor_pb2.TensorProto], max_bytes: int = 0) -> dict[str, np.ndarray]:
    """A request's `inputs` map of TensorProtos, decoded (`checked_shapes`, then `decode`)."""
    return decode(checked_shapes(protos, max_bytes)[0])


# A request's inputs ready to decode: (alias, TensorProto, checked shape).
Inputs = list[tuple[str, tensor_pb2.TensorProto, tuple[int, ...]]]


def checked_shapes(protos: Mapping[str, tensor_pb2.TensorProto], max_bytes: int = 0) -> tuple[Inputs, int]:
    """Each input with its shape, checked as Tensor::FromProto checks it, and the bytes decoding them all
    takes (a compact tensor, with fewer values than its shape, expands). Nothing is allocated: inputs
    that would take more than `max_bytes` (> 0) are refused here."""
    inputs: Inputs = []
    sizes = []
    total = 0
    for alias, proto in protos.items():
        shape, size = _checked_shape(proto, alias)
        if proto.dtype == types_pb2.DT_STRING:
            size += sum(map(len, proto.string_val))
        inputs.append((alias, proto, shape))
        sizes.append((alias, shape, size))
        total += size
    if 0 < max_bytes < total:
        check_decoded_bytes(sizes, max_bytes)
    return inputs, total


def decode(inputs: Inputs) -> dict[str, np.ndarray]:
    """The tensors of `checked_shapes`' inputs."""
    return {alias: _decode(proto, alias, shape) for alias, proto, shape in inputs}


def decoded_nbytes(array: np.ndarray) -> int:
    """The bytes a decoded tensor takes: its buffer, plus the bytes of a string tensor's elements."""
    if array.dtype == object:
        return array.size * _POINTER_BYTES + sum(len(v) for v in array.flat if isinstance(v, bytes))
    return array.nbytes


def check_decoded_bytes(tensors: Iterable[tuple[str, Sequence[int], int]], max_bytes: int) -> None:
    """INVALID_ARGUMENT when input tensors (name, shape, decoded bytes) together exceed `max_bytes` (> 0)."""
    total = 0
    for name, shape, size in tensors:
        total += size
        if total > max_bytes:
            together = f" ({total} with the inputs before it)" if total != size else ""
            raise invalid_argument(
                f"Input tensor {name} of shape [{','.join(str(d) for d in shape)}] needs {size} bytes decoded"
                f"{together}, over the limit of {max_bytes} bytes (--max_decoded_tensor_bytes)"
            )


def _checked_shape(proto: tensor_pb2.TensorProto, name: str) -> tuple[tuple[int, ...], int]:
    """The shape, if TF's TensorShape::IsValid accepts it, the dtype is a value type and the tensor could
    be allocated at all; and the bytes of its buffer (for strings, the pointers)."""
    entry = _DTYPES.get(proto.dtype)
    shape = tuple([d.size for d in proto.tensor_shape.dim])
    if entry is None or len(shape) > MAX_RANK or (shape and min(shape) < 0):
        raise invalid_argument(f"tensor parsing error: {name}")
    count = math.prod(shape)
    size = count * entry[0].itemsize
    if count > _MAX_ELEMENTS or size > _ADDRESSABLE_BYTES:
        raise invalid_argument(f"tensor parsing error: {name}")
    return shape, size


def _decode(proto: tensor_pb2.TensorProto, name: str, shape: tuple[int, ...]) -> np.ndarray:
    np_dtype, field, _ = _DTYPES[proto.dtype]
    count = math.prod(shape)
    if proto.tensor_content and proto.dtype != types_pb2.DT_STRING:
        if len(proto.tensor_content) != count * np_dtype.itemsize:
            raise invalid_argument(f"tensor parsing error: {name}")
        return np.frombuffer(proto.tensor_content, dtype=np_dtype).reshape(shape)
    values = getattr(proto, field)
    if proto.dtype in _COMPLEX:
        if len(values) % 2:
            raise invalid_argument(f"tensor parsing error: {name}")
        flat = np.array(values, dtype=np.zeros(0, np_dtype).real.dtype).view(np_dtype)
    elif proto.dtype in _HALF_BITS:
        flat = np.array(values, dtype=np.uint16).view(np_dtype)
    elif proto.dtype == types_pb2.DT_STRING:
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
    else:
        flat = np.array(values, dtype=np_dtype)
    if flat.size == count:
        return flat.reshape(shape)
    if flat.size > count:
        raise invalid_argument(f"tensor parsing error: {name}")
    try:
        filled = np.empty(count, dtype=np_dtype)
    except (MemoryError, ValueError):  # a shape too big to allocate: TF rejects the proto the same way
        raise invalid_argument(f"tensor parsing error: {name}") from None
    filled[:] = flat[-1] if flat.size else (b"" if proto.dtype == types_pb2.DT_STRING else 0)
    filled[: flat.size] = flat
    return filled.reshape(shape)


def to_proto(array: np.ndarray, tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """Encode a numpy array; `*_val` fields unless `tensor_content` (never for strings)."""
    dtype = dtype_of(array)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.SetInParent()  # present even for a scalar, as TF writes it
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add(size=size)
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(_as_bytes(v) for v in array.ravel())
    elif tensor_content:
        proto.tensor_content = _little_endian_bytes(array)
    elif dtype in _PACKED_FIELDS:
        proto.MergeFromString(length_delimited(_PACKED_FIELDS[dtype], _little_endian_bytes(array)))
    elif dtype in _HALF_BITS:
        proto.half_val.extend(array.ravel().view(np.uint16).tolist())
    elif dtype in _COMPLEX:
        getattr(proto, _DTYPES[dtype][1]).extend(array.ravel().view(array.real.dtype).tolist())
    else:
        getattr(proto, _DTYPES[dtype][1]).extend(array.ravel().tolist())
    return proto


def encode_proto(array: np.ndarray, tensor_content: bool = False) -> bytes:
    """`to_proto(array, tensor_content).SerializeToString()`, written directly when the values go out in one
    piece (tensor_content, or float_val/double_val packed): no message is built, which was most of a small
    gRPC response's cost."""
    dtype = dtype_of(array)
    if dtype == types_pb2.DT_STRING or not (tensor_content or dtype in _PACKED_FIELDS):
        return to_proto(array, tensor_content).SerializeToString()
    dims = b"".join(_DIM_BYTES[size] if size < len(_DIM_BYTES) else _dim_bytes(size) for size in array.shape)
    data = _little_endian_bytes(array)
    field = _TENSOR_CONTENT if tensor_content else _PACKED_FIELDS[dtype]
    header = _varint(field << 3 | _LENGTH_DELIMITED) + _varint(len(data)) if data else b""
    return b"".join((_DTYPE_BYTES[dtype], length_delimited(_TENSOR_SHAPE, dims), header, data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(number: int, data: bytes) -> bytes:
    """Protobuf's encoding of a length-delimited field (a message, bytes, packed values): tag, length, data."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(data)) + data


def _dim_bytes(size: int) -> bytes:
    """One TensorShapeProto.Dim entry of `size` (a zero size is an empty message, as protobuf omits it)."""
    return length_delimited(_DIM, (_varint(_DIM_SIZE << 3) + _varint(size)) if size else b"")


# The protobuf field numbers of float_val and double_val. Their packed wire encoding is the raw
# little-endian values (what tensor_content holds), so a response's values are copied in one piece,
# not set one Python float at a time (that took 11 ms for 1 MiB of float32, the default encoding
# TF Serving clients receive).
_PACKED_FIELDS = {
    types_pb2.DT_FLOAT: tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name["float_val"].number,
    types_pb2.DT_DOUBLE: tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name["double_val"].number,
}
_LENGTH_DELIMITED = 2


def _little_endian_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


_TENSOR_SHAPE = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name["tensor_shape"].number
_TENSOR_CONTENT = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name["tensor_content"].number
_DIM = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name["tensor_shape"].message_type.fields_by_name["dim"].number
_DIM_SIZE = 1  # TensorShapeProto.Dim.size
_DTYPE_FIELD = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name["dtype"].number
_DTYPE_BYTES = {dtype: _varint(_DTYPE_FIELD << 3) + _varint(dtype) for dtype in _DTYPES}
_DIM_BYTES = [_dim_bytes(size) for size in range(128)]  # the common sizes, encoded once

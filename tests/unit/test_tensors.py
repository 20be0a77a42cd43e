"""TensorProto <-> numpy as TensorFlow converts them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from pyserving import tensors
from pyserving.errors import ServingError


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([1.5, -2.0]),
        np.array([[1, 2]], np.int32),
        np.array([3], np.int64),
        np.array([True, False]),
        np.array([1.5], np.float16),
        np.array([1 + 2j], np.complex64),
        np.array([b"a", b"\xff"], dtype=object),
        np.float32(2.0).reshape(()),
    ],
)
@pytest.mark.parametrize("tensor_content", [False, True])
def test_round_trip_matches_tensorflows_own_conversion(array, tensor_content):
    proto = tensors.to_proto(array, tensor_content)
    assert tf.make_ndarray(proto).tolist() == array.tolist()
    decoded = tensors.to_ndarray(proto, "x")
    assert decoded.dtype == array.dtype and decoded.tolist() == array.tolist()
    assert proto.HasField("tensor_shape")  # present even for a scalar, as TF writes it


def test_packed_float_val_is_the_encoding_protobuf_would_write():
    array = np.random.default_rng(0).random(1000).astype(np.float32)
    ours = tensors.to_proto(array)
    reference = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    reference.tensor_shape.dim.add(size=1000)
    reference.float_val.extend(array.tolist())
    assert ours.SerializeToString() == reference.SerializeToString()


def test_a_short_value_list_repeats_its_last_value():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0])
    proto.tensor_shape.dim.add(size=4)
    assert tensors.to_ndarray(proto, "x").tolist() == tf.make_ndarray(proto).tolist() == [1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.tensor_shape.dim.add(size=-1),  # negative dimension
        lambda p: setattr(p, "tensor_content", b"\x00" * 3),  # not a whole number of floats
        lambda p: [p.tensor_shape.dim.add(size=2**40) for _ in range(2)],  # more elements than int64 holds
        lambda p: setattr(p, "dtype", types_pb2.DT_RESOURCE),  # not a value type
        lambda p: [p.tensor_shape.dim.add(size=1) for _ in range(64)],  # 65 dimensions (TensorShape holds 64)
    ],
)
def test_malformed_protos_are_tensor_parsing_errors(mutate):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    proto.tensor_shape.dim.add(size=1)
    mutate(proto)
    with pytest.raises(ServingError) as info:
        tensors.to_ndarray(proto, "x")
    assert info.value.message == "tensor parsing error: x"


def test_type_names_are_tfs():
    assert tensors.type_name(types_pb2.DT_FLOAT) == "float"
    assert tensors.type_name(types_pb2.DT_FLOAT_REF) == "float"
    assert tensors.type_name(types_pb2.DT_RESOURCE) == "resource"


def _compact(dtype: int, *dims: int, **values: list) -> tensor_pb2.TensorProto:
    """A tensor with fewer values than its shape holds (TF repeats the last one)."""
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    return proto


def test_64_dimensions_decode():
    proto = _compact(types_pb2.DT_FLOAT, *[1] * 64, float_val=[2.0])
    assert tensors.to_ndarray(proto, "x").shape == (1,) * 64


def test_decoded_size_limit_refuses_compact_tensors_before_allocating():
    floats = _compact(types_pb2.DT_FLOAT, 100_000_000, float_val=[1.0])
    assert len(floats.SerializeToString()) < 20
    assert tensors.checked_shapes({"x": floats}) == ([("x", floats, (100_000_000,))], 400_000_000)
    with pytest.raises(ServingError) as info:
        tensors.to_ndarrays({"x": floats}, max_bytes=2**28)
    assert info.value.message == (
        "Input tensor x of shape [100000000] needs 400000000 bytes decoded, over the limit of 268435456 bytes "
        "(--max_decoded_tensor_bytes)"
    )
    strings = _compact(types_pb2.DT_STRING, 2**31, string_val=[b"abc"])  # pointers (8 bytes each) and the bytes
    with pytest.raises(ServingError) as info:
        tensors.to_ndarrays({"s": strings}, max_bytes=2**31)
    assert info.value.message == (
        "Input tensor s of shape [2147483648] needs 17179869187 bytes decoded, over the limit of 2147483648 bytes "
        "(--max_decoded_tensor_bytes)"
    )


def test_decoded_size_limit_counts_every_input():
    protos = {
        "a": _compact(types_pb2.DT_INT64, 2, 3, int64_val=[1]),  # 48 bytes
        "b": _compact(types_pb2.DT_STRING, 2, string_val=[b"xy", b"z"]),  # 16 + 3 bytes
    }
    assert {k: v.tolist() for k, v in tensors.to_ndarrays(protos, max_bytes=67).items()} == {
        "a": [[1] * 3] * 2,
        "b": [b"xy", b"z"],
    }
    with pytest.raises(ServingError) as info:
        tensors.to_ndarrays(protos, max_bytes=66)
    assert info.value.message == (
        "Input tensor b of shape [2] needs 19 bytes decoded (67 with the inputs before it), over the limit of 66 "
        "bytes (--max_decoded_tensor_bytes)"
    )
    assert tensors.decoded_nbytes(tensors.to_ndarray(protos["b"], "b")) == 19


def test_a_tensor_no_process_could_allocate_is_a_parsing_error_before_the_limit():
    """2**62 bytes: TF's allocation fails and Tensor::FromProto refuses the proto, as TF Serving answers."""
    proto = _compact(types_pb2.DT_FLOAT, 2**40, 2**20, float_val=[1.0])
    with pytest.raises(ServingError) as info:
        tensors.to_ndarrays({"x": proto}, max_bytes=2**31)
    assert info.value.message == "tensor parsing error: x"


_ENCODED = [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array([1.5, -2.0]),
    np.array([[1, 2]], np.int32),
    np.array([3, -(2**40)], np.int64),
    np.array([200], np.uint8),
    np.array([True, False]),
    np.array([1.5], np.float16),
    np.array([1.5], ml_dtypes.bfloat16),
    np.array([1 + 2j], np.complex128),
    np.array([b"a", b"\xff"], dtype=object),
    np.float32(2.0).reshape(()),
    np.zeros((0, 3), np.float32),  # no values: no value field at all
    np.zeros((3, 0), np.float64),
    np.ones((1, 128, 300), np.float32),  # dims past the table of encoded sizes, a 2-byte varint length
    np.arange(40_000, dtype=np.float64),  # a 3-byte varint length
    np.array([-7], np.int8).reshape(1, 1, 1),
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),  # not C-contiguous
    np.arange(10, dtype=np.float32)[::2],  # a strided view
]


@pytest.mark.parametrize("array", _ENCODED, ids=lambda a: f"{a.dtype}{list(a.shape)}")
@pytest.mark.parametrize("tensor_content", [False, True])
def test_encode_proto_is_byte_for_byte_the_messages_serialization(array, tensor_content):
    expected = tensors.to_proto(array, tensor_content).SerializeToString()
    assert tensors.encode_proto(array, tensor_content) == expected
    assert tensor_pb2.TensorProto.FromString(expected) == tensors.to_proto(array, tensor_content)


def test_encode_proto_refuses_what_to_proto_refuses():
    array = np.array(["2026-01-01"], dtype="datetime64[D]")
    for encode in (tensors.to_proto, tensors.encode_proto):
        with pytest.raises(ServingError) as info:
            encode(array)
        assert info.value.message == "Unsupported tensor dtype: datetime64[D]"

"""TensorProto <-> numpy as TensorFlow converts them."""

from __future__ import annotations

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

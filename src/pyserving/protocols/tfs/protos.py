"""TF Serving's API protos <-> the data plane's types (gRPC requests and warmup records share them)."""

from __future__ import annotations

import functools

import numpy as np
from tensorflow_serving.apis import get_model_status_pb2, model_pb2, predict_pb2, status_pb2

from pyserving import tensors
from pyserving.serving import ModelSpec, VersionStatus

__all__ = ["effective_spec", "model_spec", "predict_response_bytes", "version_status"]

_OUTPUTS = predict_pb2.PredictResponse.DESCRIPTOR.fields_by_name["outputs"].number
_MODEL_SPEC = predict_pb2.PredictResponse.DESCRIPTOR.fields_by_name["model_spec"].number
_MAP_KEY, _MAP_VALUE = 1, 2  # a map entry's fields


def model_spec(proto: model_pb2.ModelSpec) -> ModelSpec:
    """From the serving API's ModelSpec (its `version_choice` oneof)."""
    choice = proto.WhichOneof("version_choice")
    return ModelSpec(
        name=proto.name,
        version=proto.version.value if choice == "version" else None,
        label=proto.version_label if choice == "version_label" else None,
        signature_name=proto.signature_name,
    )


def effective_spec(name: str, version: int, signature_name: str) -> model_pb2.ModelSpec:
    """The ModelSpec a response reports: the version that ran, the signature key used."""
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    spec.version.value = version
    return spec


def version_status(status: VersionStatus) -> get_model_status_pb2.ModelVersionStatus:
    error = status.error
    return get_model_status_pb2.ModelVersionStatus(
        version=status.version,
        state=int(status.state),
        status=status_pb2.StatusProto(
            error_code=int(error.code) if error else 0,
            error_message=error.message if error else "",
        ),
    )


def predict_response_bytes(
    model: str, version: int, signature_name: str, outputs: dict[str, np.ndarray], tensor_content: bool
) -> bytes:
    """A serialized PredictResponse, written without building the message: byte for byte what
    `SerializeToString(deterministic=True)` writes for the message `effective_spec` and `tensors.to_proto`
    would build (outputs in key order)."""
    parts = []
    for alias in sorted(outputs, key=_map_order):
        entry = tensors.length_delimited(_MAP_KEY, alias.encode()) + tensors.length_delimited(
            _MAP_VALUE, tensors.encode_proto(outputs[alias], tensor_content)
        )
        parts.append(tensors.length_delimited(_OUTPUTS, entry))
    parts.append(_spec_bytes(model, version, signature_name))
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _spec_bytes(model: str, version: int, signature_name: str) -> bytes:
    """The response's model_spec field, the same for every answer of a version's signature."""
    return tensors.length_delimited(_MODEL_SPEC, effective_spec(model, version, signature_name).SerializeToString())


def _map_order(key: str) -> bytes:
    """The order deterministic serialization writes string map keys in: bytewise, a key before its own
    prefixes (0xFF never occurs in UTF-8, so it sorts after every byte that can follow)."""
    return key.encode() + b"\xff"

"""TF Serving's API protos <-> the data plane's types (gRPC requests and warmup records share them)."""

from __future__ import annotations

from tensorflow_serving.apis import get_model_status_pb2, model_pb2, status_pb2

from pyserving.serving import ModelSpec, VersionStatus

__all__ = ["effective_spec", "model_spec", "version_status"]


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

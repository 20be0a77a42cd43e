"""Text-format config files, and the TF Serving config messages the `tensorflow-serving-api` wheel lacks.

`MonitoringConfig` (monitoring_config.proto), `SSLConfig` (ssl_config.proto) and
`BatchingParameters` (session_bundle_config.proto) are declared here field for
field, with TF Serving's package, names and numbers, so text-format files
written for TF Serving parse unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message,
    message_factory,
    text_format,
    wrappers_pb2,  # noqa: F401  (registers the wrapper types BatchingParameters uses)
)

from pyserving.errors import Code, ServingError, invalid_argument

log = logging.getLogger("pyserving")
__all__ = [
    "BatchingParameters",
    "MonitoringConfig",
    "PrometheusConfig",
    "SSLConfig",
    "parse_bytes",
    "parse_file",
    "read_bytes",
]

M = TypeVar("M", bound=message.Message)

_F = descriptor_pb2.FieldDescriptorProto


def _file(
    name: str, messages: dict[str, list[tuple]], dependencies: tuple[str, ...] = ()
) -> descriptor_pb2.FileDescriptorProto:
    """A proto3 file in package tensorflow.serving.

    Fields are (name, number, type, message type name[, label]); the label defaults to optional.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name=name, package="tensorflow.serving", syntax="proto3", dependency=dependencies
    )
    for message_name, fields in messages.items():
        message = proto.message_type.add(name=message_name)
        for field_name, number, kind, type_name, *label in fields:
            field = message.field.add(
                name=field_name, number=number, type=kind, label=label[0] if label else _F.LABEL_OPTIONAL
            )
            if type_name:
                field.type_name = type_name
    return proto


def _messages(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindFileByName(proto.name)
    except KeyError:
        descriptor = pool.AddSerializedFile(proto.SerializeToString())
    return {
        name: message_factory.GetMessageClass(descriptor.message_types_by_name[name])
        for name in descriptor.message_types_by_name
    }


_MONITORING = _messages(
    _file(
        "tensorflow_serving/config/monitoring_config.proto",
        {
            "PrometheusConfig": [("enable", 1, _F.TYPE_BOOL, ""), ("path", 2, _F.TYPE_STRING, "")],
            "MonitoringConfig": [("prometheus_config", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")],
        },
    )
)
_SSL = _messages(
    _file(
        "tensorflow_serving/config/ssl_config.proto",
        {
            "SSLConfig": [
                ("server_key", 1, _F.TYPE_STRING, ""),
                ("server_cert", 2, _F.TYPE_STRING, ""),
                ("custom_ca", 3, _F.TYPE_STRING, ""),
                ("client_verify", 4, _F.TYPE_BOOL, ""),
            ],
        },
    )
)

_I64, _STR, _BOOL = ".google.protobuf.Int64Value", ".google.protobuf.StringValue", ".google.protobuf.BoolValue"
_BATCHING = _messages(
    _file(
        "tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        {
            "BatchingParameters": [
                ("max_batch_size", 1, _F.TYPE_MESSAGE, _I64),
                ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _I64),
                ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _I64),
                ("num_batch_threads", 4, _F.TYPE_MESSAGE, _I64),
                ("thread_pool_name", 5, _F.TYPE_MESSAGE, _STR),
                ("allowed_batch_sizes", 6, _F.TYPE_INT64, "", _F.LABEL_REPEATED),
                ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, ""),
                ("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, _BOOL),
                ("max_execution_batch_size", 9, _F.TYPE_MESSAGE, _I64),
            ],
        },
        dependencies=("google/protobuf/wrappers.proto",),
    )
)

# Built at run time from descriptors, so typed as Any (their fields are TF Serving's).
MonitoringConfig: Any = _MONITORING["MonitoringConfig"]
PrometheusConfig: Any = _MONITORING["PrometheusConfig"]
SSLConfig: Any = _SSL["SSLConfig"]
BatchingParameters: Any = _BATCHING["BatchingParameters"]


def parse_file(path: str, message_class: type[M]) -> M:
    """Read a text-format proto file with TF Serving's errors (NOT_FOUND, `Invalid protobuf file`)."""
    return parse_bytes(read_bytes(path), path, message_class)


def read_bytes(path: str) -> bytes:
    """A config file's bytes; NOT_FOUND as TF Serving says it if unreadable."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ServingError(Code.NOT_FOUND, f"{path}; {exc.strerror or exc}") from None


def parse_bytes(data: bytes, path: str, message_class: type[M]) -> M:
    """Parse the text-format bytes of the file at `path` (for the errors), as `parse_file` does."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServingError(Code.NOT_FOUND, f"{path}; {exc}") from None
    parsed = message_class()
    try:
        text_format.Parse(text, parsed)
    except text_format.ParseError as exc:
        log.error("Error parsing text-format %s: %s", parsed.DESCRIPTOR.full_name, exc)
        raise invalid_argument(f"Invalid protobuf file: '{path}'") from None
    return parsed

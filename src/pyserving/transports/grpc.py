"""The gRPC transport: one grpc.aio server on the event loop, carrying whatever services are mounted on it.

A protocol contributes a `Service`: a function that adds its handlers to the
server. `unary_service` builds one from a servicer object and the service's
descriptor, like the generated `add_*_to_server`, except that request bytes
that do not parse answer INVALID_ARGUMENT (gRPC's own deserializer would answer
UNKNOWN), and a handler may answer its response already serialized (bytes).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory

__all__ = [
    "Service",
    "bind",
    "channel_arguments",
    "create_server",
    "credentials",
    "session_timeout_ms",
    "unary_service",
]

log = logging.getLogger("pyserving")

_MAX_MESSAGE_BYTES = 2**31 - 1

# Adds a protocol's handlers to the server.
Service = Callable[[grpc.aio.Server], None]


def channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """`--grpc_channel_arguments=k=v,k=v`: values that parse as int32 are ints, like TF Serving."""
    arguments: list[tuple[str, int | str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            log.warning("Ignoring gRPC channel argument without '=': %s", item)
            continue
        try:
            number = int(value)
            arguments.append((key, number) if -(2**31) <= number < 2**31 else (key, value))
        except ValueError:
            arguments.append((key, value))
    return arguments


def session_timeout_ms(remaining_s: float | None) -> int:
    """An RPC's remaining deadline as a runtime timeout, like TF Serving (0 = none).

    Rounded up to a power of two milliseconds: the runtime caches one callable per
    timeout value, and exact deadlines would make that cache useless.
    """
    if remaining_s is None:
        return 0
    millis = max(math.ceil(remaining_s * 1000), 1)
    return 1 << (millis - 1).bit_length()


def create_server(services: Sequence[Service], arguments: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Server:
    """A grpc.aio server (messages up to 2 GiB, as TF Serving allows) with `services` mounted."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            *arguments,
        ]
    )
    for service in services:
        service(server)
    return server


def credentials(cert_pem: str, key_pem: str, ca_pem: str = "", client_verify: bool = False) -> grpc.ServerCredentials:
    """TLS server credentials from PEM contents; with `client_verify`, mTLS against `ca_pem`."""
    return grpc.ssl_server_credentials(
        [(key_pem.encode(), cert_pem.encode())],
        root_certificates=ca_pem.encode() or None,
        require_client_auth=client_verify,
    )


def bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> None:
    """Listen on `address` (`host:port` or `unix:path`); `RuntimeError` if it cannot be bound."""
    if creds is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, creds)


def unary_service(servicer: object, service: descriptor.ServiceDescriptor) -> Service:
    """The unary methods of `service` the servicer has coroutines of the same names for (the others answer
    UNIMPLEMENTED)."""
    handlers = {}
    for method in service.methods:
        if not hasattr(servicer, method.name) or method.client_streaming or method.server_streaming:
            continue
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _reject_unparsable(getattr(servicer, method.name)),
            request_deserializer=functools.partial(_parse, request_class),
            response_serializer=functools.partial(_serialize, response_class.SerializeToString),
        )
    handler = grpc.method_handlers_generic_handler(service.full_name, handlers)
    return lambda server: server.add_generic_rpc_handlers((handler,))


class _Unparsable:
    """What a request that is not a valid serialized proto deserializes to."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _parse(request_class: type[message.Message], data: bytes) -> Any:
    try:
        return request_class.FromString(data)
    except message.DecodeError:
        return _Unparsable(request_class.DESCRIPTOR.full_name)


def _serialize(serialize: Callable[[Any], bytes], response: Any) -> bytes:
    """A response message's bytes; a handler may also answer the serialized message itself (built
    without the message, see protocols.tfs.protos.predict_response_bytes)."""
    return response if type(response) is bytes else serialize(response)


def _reject_unparsable(
    handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    @functools.wraps(handler)
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Failed to parse the request as {request.type_name}")
        return await handler(request, context)

    return checked

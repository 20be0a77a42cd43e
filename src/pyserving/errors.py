"""pyserving's exception tree, and the mapping of serving errors to HTTP and gRPC.

Every exception pyserving raises on purpose is a `PyservingError`. Every failure
that reaches a client (or aborts start-up) is a `ServingError` carrying a
canonical status code (the absl/gRPC code space TF Serving uses) and TF
Serving's message; protocols translate it exactly once: REST via
`http_status`, gRPC via `grpc_code`.
"""

from __future__ import annotations

import enum

import grpc

__all__ = [
    "INTERNAL_ERROR",
    "Code",
    "PyservingError",
    "ServingError",
    "c_escape",
    "from_tf_error",
    "invalid_argument",
    "not_found",
]


class Code(enum.IntEnum):
    """Canonical status codes (same numbers as absl::StatusCode and gRPC)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_HTTP_STATUS = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.OUT_OF_RANGE: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.PERMISSION_DENIED: 403,
    Code.UNAUTHENTICATED: 401,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
}

_GRPC_MESSAGE_LIMIT = 1024
# What a client gets for an exception that is not a ServingError (a bug): no Python class or text,
# which the server log has with the traceback.
INTERNAL_ERROR = "Internal error"


class PyservingError(Exception):
    """Base of every exception pyserving raises on purpose (usage, tool and serving errors)."""


class ServingError(PyservingError):
    """A request or load failure with a canonical code and a client-facing message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code.name]

    @property
    def grpc_message(self) -> str:
        """The message as TF Serving sends it over gRPC: cut at 1024 characters. Bytes that are not
        UTF-8 (kept as lone surrogates, e.g. a request's string in TF's message) become U+FFFD, as
        gRPC sends text."""
        message = self.message
        if not message.isascii():
            message = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if len(message) > _GRPC_MESSAGE_LIMIT:
            return message[:_GRPC_MESSAGE_LIMIT] + "...TRUNCATED"
        return message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def c_escape(data: bytes) -> str:
    """Bytes for an error message as C code would print them (absl::CHexEscape): printable ASCII as is,
    quotes and backslashes escaped, \\n \\r \\t, every other byte as \\xNN; never Python's b'...' repr."""
    special = {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x27: "\\'", 0x5C: "\\\\"}
    return "".join(special.get(byte) or (chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}") for byte in data)


def invalid_argument(message: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(Code.NOT_FOUND, message)


def from_tf_error(exc: Exception) -> ServingError:
    """Translate a TensorFlow `OpError` (or anything else) into a ServingError."""
    if isinstance(exc, ServingError):
        return exc
    code = getattr(exc, "error_code", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(code, int):
        try:
            return ServingError(Code(code), message)
        except ValueError:  # not a canonical code
            pass
    return ServingError(Code.UNKNOWN, message)

"""The Open Inference Protocol's operations on the data plane, shared by its REST and gRPC adapters.

An adapter turns its wire format into `InputTensor`s and a `ModelSpec`; this
module checks them against the signature, decodes them (inline when small, on a
worker thread when big), runs the data plane's predict (batching, metrics and
version leases included) and describes servers, models and the repository as
the protocol's JSON documents, which the gRPC adapter copies into messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2

import pyserving
from pyserving import tensors
from pyserving.concurrency import run_sized
from pyserving.errors import ServingError, invalid_argument, not_found
from pyserving.lifecycle.manager import State
from pyserving.protocols.v2 import datatypes
from pyserving.runtimes.servable import DEFAULT_SIGNATURE
from pyserving.serving import DataPlane, ModelSpec, PredictResult, Target

__all__ = [
    "EXTENSIONS",
    "INFER_SPAN",
    "SIGNATURE_PARAMETER",
    "InputTensor",
    "Inference",
    "Repository",
    "decode_inputs",
    "infer_signature",
    "model_spec",
]

SIGNATURE_PARAMETER = "signature_name"
INFER_SPAN = "v2.infer"  # the tracing span of an infer call, over REST or gRPC
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_MAX_VERSION = 2**63 - 1
# The repository index's states, as Triton names them.
_STATES = {
    State.START: "LOADING",
    State.LOADING: "LOADING",
    State.AVAILABLE: "READY",
    State.UNLOADING: "UNLOADING",
    State.END: "UNAVAILABLE",
}


@dataclass(slots=True)
class InputTensor:
    """One input as the request carries it, not yet checked."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: Any  # JSON values, raw bytes, or gRPC typed contents
    encoding: Literal["json", "raw", "typed"]


class Repository(Protocol):
    """What the model repository extension needs from the server core."""

    def readiness(self) -> tuple[bool, dict[str, str]]: ...

    def model_names(self) -> list[str]: ...

    def load_model(self, name: str) -> None: ...

    def unload_model(self, name: str) -> None: ...


def model_spec(name: str, version: str, parameters: Mapping[str, Any]) -> ModelSpec:
    """The data plane's spec: `version` a number, a TF Serving version label, or "" for the latest;
    the signature from the `signature_name` parameter."""
    signature = parameters.get(SIGNATURE_PARAMETER, "")
    if not isinstance(signature, str):
        raise invalid_argument(f"parameter '{SIGNATURE_PARAMETER}' must be a string")
    if not name:
        raise invalid_argument("missing model name")
    if not version:
        return ModelSpec(name, signature_name=signature)
    if version.isdigit() and version.isascii():
        number = int(version)
        if number > _MAX_VERSION:
            raise invalid_argument(f"invalid model version {version}")
        return ModelSpec(name, number, signature_name=signature)
    return ModelSpec(name, label=version, signature_name=signature)


def infer_signature(
    signatures: Mapping[str, meta_graph_pb2.SignatureDef], name: str
) -> tuple[str, meta_graph_pb2.SignatureDef]:
    """(key, signature) that an infer call's `signature_name` parameter (`name`, or the default) picks."""
    key = name or DEFAULT_SIGNATURE
    signature = signatures.get(key)
    if signature is None:
        raise invalid_argument(
            f"signature '{key}' not found; the model has {', '.join(_names(signatures))} "
            f"(choose one with the request parameter '{SIGNATURE_PARAMETER}')"
        )
    return key, signature


def decode_inputs(
    signature: meta_graph_pb2.SignatureDef, inputs: Sequence[InputTensor], max_bytes: int
) -> dict[str, np.ndarray]:
    """The inputs as arrays, checked against the signature and `max_bytes` (> 0) before any is built."""
    checked = []
    for tensor in inputs:
        dims, count, nbytes = datatypes.check_shape(tensor.name, tensor.datatype, tensor.shape)
        info = signature.inputs.get(tensor.name)
        if info is not None:  # an unknown name is the data plane's error, with the signature's inputs
            expected = datatypes.datatype_of_tf(info.dtype)
            if tensor.datatype != expected:
                raise invalid_argument(
                    f"input '{tensor.name}' has datatype {tensor.datatype}; the model expects {expected}"
                )
        checked.append((tensor, dims, count, nbytes))
    if max_bytes > 0:
        tensors.check_decoded_bytes(((t.name, dims, nbytes) for t, dims, _, nbytes in checked), max_bytes)
    arrays = {}
    for tensor, dims, count, _ in checked:
        if tensor.name in arrays:
            raise invalid_argument(f"input '{tensor.name}' appears more than once")
        decode = _DECODERS[tensor.encoding]
        arrays[tensor.name] = decode(tensor.name, tensor.datatype, dims, count, tensor.data)
    return arrays


_DECODERS: dict[str, Callable[..., np.ndarray]] = {
    "json": datatypes.from_json,
    "raw": datatypes.from_raw,
    "typed": datatypes.from_typed,
}


class Inference:
    """The protocol's operations: inference, health, metadata and the model repository."""

    def __init__(self, dataplane: DataPlane, repository: Repository, pool: Executor) -> None:
        self._dataplane = dataplane
        self._repository = repository
        self.pool = pool  # where decoding, encoding and metadata work leave the event loop

    def metric_label(self, name: str) -> str:
        return self._dataplane.metric_label(name)

    async def infer(
        self, spec: ModelSpec, inputs: Sequence[InputTensor], outputs: Sequence[str], size: int, timeout_ms: int = 0
    ) -> PredictResult:
        """Run the spec's signature; `size` (the request's bytes) decides whether decoding leaves the loop."""
        with self._dataplane.resolve(spec) as target:
            key, signature = infer_signature(target.signature_defs, spec.signature_name)
            arrays = await run_sized(
                self.pool, size, decode_inputs, signature, inputs, self._dataplane.max_decoded_bytes
            )
            return await self._dataplane.predict(target, key, arrays, outputs, timeout_ms, self.pool)

    def resolve(self, spec: ModelSpec) -> Target:
        """The data plane's lease of the version `spec` targets (for a body decoded elsewhere: `run`)."""
        return self._dataplane.resolve(spec)

    @property
    def max_decoded_bytes(self) -> int:
        return self._dataplane.max_decoded_bytes

    async def run(
        self, target: Target, key: str, arrays: dict[str, np.ndarray], outputs: Sequence[str], timeout_ms: int = 0
    ) -> PredictResult:
        """`infer` for inputs already decoded against `target`'s signature `key`."""
        return await self._dataplane.predict(target, key, arrays, outputs, timeout_ms, self.pool)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "pyserving", "version": pyserving.__version__, "extensions": EXTENSIONS}

    def server_ready(self) -> bool:
        return self._repository.readiness()[0]

    def model_ready(self, spec: ModelSpec) -> bool:
        """Whether the spec's version can serve now; NOT_FOUND for a model that is not configured."""
        if not self._dataplane.knows(spec.name):
            raise not_found(f"Model {spec.name} is not served")
        try:
            with self._dataplane.resolve(spec):
                return True
        except ServingError:
            return False

    def model_metadata(self, spec: ModelSpec) -> dict[str, Any]:
        """Name, ready versions, platform, and the inputs and outputs of the default signature (or of the
        `signature_name` parameter's, or the first one's when there is no default)."""
        with self._dataplane.resolve(spec) as target:
            signatures = target.signature_defs
            key = spec.signature_name or (
                DEFAULT_SIGNATURE if DEFAULT_SIGNATURE in signatures or not signatures else min(signatures)
            )
            signature = signatures.get(key)
            if signature is None:
                raise invalid_argument(f"signature '{key}' not found")
            platform = target.platform
        versions = [
            str(s.version)
            for s in sorted(self._dataplane.status(spec.name, None), key=lambda s: s.version)
            if s.state == State.AVAILABLE
        ]
        return {
            "name": spec.name,
            "versions": versions,
            "platform": platform,
            "inputs": _tensor_metadata(signature.inputs),
            "outputs": _tensor_metadata(signature.outputs),
        }

    def repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        """Every model and version the repository knows, with Triton's state names."""
        index = []
        for name in self._repository.model_names():
            try:
                statuses = self._dataplane.status(name, None)
            except ServingError:  # configured, no version seen yet
                statuses = []
            if not statuses and not ready_only:
                index.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "no version found"})
            for status in sorted(statuses, key=lambda s: s.version):
                if ready_only and status.state != State.AVAILABLE:
                    continue
                reason = status.error.message if status.error else ""
                index.append(
                    {"name": name, "version": str(status.version), "state": _STATES[status.state], "reason": reason}
                )
        return index

    def load(self, name: str) -> None:
        self._repository.load_model(name)

    def unload(self, name: str) -> None:
        self._repository.unload_model(name)


def _names(signatures: Mapping[str, Any]) -> list[str]:
    """Signature keys a request can name (not TF's `__saved_model_init_op`)."""
    return sorted(key for key in signatures if not key.startswith("__"))


def _tensor_metadata(infos: Mapping[str, meta_graph_pb2.TensorInfo]) -> list[dict[str, Any]]:
    described = []
    for alias in sorted(infos):
        info = infos[alias]
        shape = [-1] if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
        described.append({"name": alias, "datatype": datatypes.datatype_of_tf(info.dtype), "shape": shape})
    return described

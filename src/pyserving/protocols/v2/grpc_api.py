"""The Open Inference Protocol's gRPC side: `inference.GRPCInferenceService` over `inference`.

Messages are Triton's generated ones (`tritonclient.grpc.service_pb2`, the
protocol's reference protos). Inputs come as `raw_input_contents` or typed
`contents`; outputs always go back as `raw_output_contents`, as Triton answers.
Health, metadata, infer and the repository RPCs are served; the others
(streaming, shared memory, statistics, trace and log settings, model config)
answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import service_pb2

from pyserving import metrics, tracing
from pyserving.concurrency import run_sized, run_sync
from pyserving.errors import INTERNAL_ERROR, Code, ServingError, invalid_argument
from pyserving.protocols.v2 import datatypes
from pyserving.protocols.v2.inference import INFER_SPAN, Inference, InputTensor, model_spec
from pyserving.serving import PredictResult
from pyserving.transports.grpc import Service, session_timeout_ms, unary_service

__all__ = ["InferenceService", "services"]

log = logging.getLogger("pyserving")
T = TypeVar("T")
_SERVICE = "inference.GRPCInferenceService"  # a traced call's rpc.service

# The typed contents field of each datatype (FP16 and BF16 have none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def services(servicer: InferenceService) -> list[Service]:
    return [unary_service(servicer, service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])]


async def _answer(work: Awaitable[T], context: grpc.aio.ServicerContext, what: str) -> T:
    """Await `work`; a ServingError becomes the RPC status, a bug INTERNAL (logged)."""
    try:
        return await work
    except ServingError as exc:
        await context.abort(exc.grpc_code, exc.grpc_message)
        raise
    except Exception:
        log.exception("Unexpected error handling %s", what)
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)
        raise


def _parameters(parameters: Mapping[str, service_pb2.InferParameter]) -> dict[str, Any]:
    values = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, kind) if kind else None
    return values


class InferenceService:
    """The servicer: one coroutine per implemented RPC."""

    def __init__(self, inference: Inference) -> None:
        self._inference = inference

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 (gRPC names)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self._inference.server_ready())

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.ServerMetadataResponse(**self._inference.server_metadata())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _answer(self._model_ready(request), context, "ModelReady")

    async def _model_ready(self, request: Any) -> Any:
        spec = model_spec(request.name, request.version, {})
        ready = await run_sync(self._inference.pool, self._inference.model_ready, spec)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _answer(self._model_metadata(request), context, "ModelMetadata")

    async def _model_metadata(self, request: Any) -> Any:
        spec = model_spec(request.name, request.version, {})
        doc = await run_sync(self._inference.pool, self._inference.model_metadata, spec)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=[tensor(**t) for t in doc["inputs"]],
            outputs=[tensor(**t) for t in doc["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        started = time.perf_counter()
        try:
            if tracing.enabled:
                metadata = context.invocation_metadata()
                with tracing.grpc_span(INFER_SPAN, metadata, _SERVICE, request.model_name, method="ModelInfer"):
                    result = await self._infer(request, session_timeout_ms(context.time_remaining()))
            else:
                result = await self._infer(request, session_timeout_ms(context.time_remaining()))
        except ServingError as exc:
            self._count(request.model_name, exc.code, started)  # before the status leaves (a client may scrape next)
            await context.abort(exc.grpc_code, exc.grpc_message)
            raise
        except Exception:
            self._count(request.model_name, Code.INTERNAL, started)
            log.exception("Unexpected error handling ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)
            raise
        self._count(request.model_name, Code.OK, started)
        return result

    def _count(self, name: str, code: Code, started: float) -> None:
        if code == Code.OK:
            metrics.REQUEST_COUNT.inc(name, code.name)
            metrics.REQUEST_LATENCY.observe(name, "infer", "GRPC", value=(time.perf_counter() - started) * 1e6)
        else:
            metrics.REQUEST_COUNT.inc(self._inference.metric_label(name), code.name)

    async def _infer(self, request: Any, timeout_ms: int) -> Any:
        spec = model_spec(request.model_name, request.model_version, _parameters(request.parameters))
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise invalid_argument(
                f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send all inputs raw or none"
            )
        inputs = []
        for index, tensor in enumerate(request.inputs):
            if raw:
                inputs.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, raw[index], "raw"))
                continue
            field = _CONTENTS.get(tensor.datatype)
            if field is None and tensor.datatype in datatypes.DATATYPES:
                raise invalid_argument(f"input '{tensor.name}' of datatype {tensor.datatype} must be raw")
            values = getattr(tensor.contents, field) if field else ()
            inputs.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, values, "typed"))
        outputs = [output.name for output in request.outputs]
        result = await self._inference.infer(spec, inputs, outputs, request.ByteSize(), timeout_ms)
        size = sum(array.nbytes for array in result.outputs.values())
        return await run_sized(self._inference.pool, size, _infer_response, result, request.id)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _answer(self._index(request.ready), context, "RepositoryIndex")

    async def _index(self, ready_only: bool) -> Any:
        index = await run_sync(self._inference.pool, self._inference.repository_index, ready_only)
        entry = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[entry(**model) for model in index])

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        work = run_sync(self._inference.pool, self._inference.load, request.model_name)
        await _answer(work, context, "RepositoryModelLoad")
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        work = run_sync(self._inference.pool, self._inference.unload, request.model_name)
        await _answer(work, context, "RepositoryModelUnload")
        return service_pb2.RepositoryModelUnloadResponse()


def _infer_response(result: PredictResult, request_id: str) -> Any:
    response = service_pb2.ModelInferResponse(model_name=result.model, model_version=str(result.version), id=request_id)
    for name, array in result.outputs.items():
        response.outputs.add(name=name, datatype=datatypes.datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(datatypes.to_raw(array))
    return response

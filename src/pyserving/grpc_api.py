"""The gRPC front-end: tensorflow.serving.PredictionService and ModelService on grpc.aio.

A thin adapter over `DataPlane`: protos in, numpy through the data plane (Predict
on the event loop with the session call off it, the other methods on a worker
thread), protos out; `ServingError` becomes the RPC status.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import message, message_factory, wrappers_pb2
from tensorflow_serving.apis import (
    classification_pb2, get_model_metadata_pb2, get_model_status_pb2, inference_pb2, model_management_pb2, model_pb2,
    model_service_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2, prediction_service_pb2_grpc,
    regression_pb2, status_pb2,
)

from pyserving import metrics, model_config, tensors
from pyserving.concurrency import run_sized, run_sync
from pyserving.dataplane import SIGNATURE_DEF_FIELD, DataPlane, ModelSpec, PredictResult
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.manager import VersionStatus
from pyserving.servable import CLASSIFY_METHOD
from pyserving.server_core import ServerCore

log = logging.getLogger("pyserving")


def _session_timeout_ms(remaining_s: float | None) -> int:
    """The RPC deadline as a TF session timeout, like TF Serving (0 = none).

    Rounded up to a power of two milliseconds: the runtime caches one callable per
    timeout value, and exact deadlines would make that cache useless.
    """
    if remaining_s is None:
        return 0
    millis = max(math.ceil(remaining_s * 1000), 1)
    return 1 << (millis - 1).bit_length()


async def _unary(work: Awaitable, request, context: grpc.aio.ServicerContext, api: str = ""):
    """Await a handler's `work` on `request`; a ServingError becomes the RPC status.

    With `api` (Predict, Classify, Regress) the call counts in request_count and,
    when it succeeds, request_latency, as in TF Serving.
    """
    started = time.perf_counter()
    code = Code.OK
    try:
        return await work
    except ServingError as exc:
        code = exc.code
        await context.abort(exc.grpc_code, exc.grpc_message)
    finally:
        if api:
            model = request.model_spec.name
            metrics.REQUEST_COUNT.inc(model, code.name)
            if code == Code.OK:
                metrics.REQUEST_LATENCY.observe(model, api, "GRPC", value=(time.perf_counter() - started) * 1e6)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, dataplane: DataPlane, pool: ThreadPoolExecutor, tensor_content: bool) -> None:
        self._dataplane = dataplane
        self._pool = pool
        self._tensor_content = tensor_content

    async def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        timeout_ms = _session_timeout_ms(context.time_remaining())
        return await _unary(self._predict(request, timeout_ms), request, context, "Predict")

    async def _predict(self, request: predict_pb2.PredictRequest, timeout_ms: int) -> predict_pb2.PredictResponse:
        """The hot path: tensors converted inline when small, the session call off the loop."""
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        spec = ModelSpec.from_proto(request.model_spec)
        inputs = await run_sized(self._pool, request.ByteSize(), tensors.to_ndarrays, request.inputs)
        result = await self._dataplane.predict_async(self._pool, spec, inputs, list(request.output_filter),
                                                     timeout_ms)
        size = sum(array.nbytes for array in result.outputs.values())
        return await run_sized(self._pool, size, self._predict_response, result)

    def _predict_response(self, result: PredictResult) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse(
            model_spec=_effective_spec(result.name, result.version, result.signature_name))
        for alias, array in result.outputs.items():
            response.outputs[alias].CopyFrom(tensors.to_proto(array, self._tensor_content))
        return response

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):
        return await _unary(run_sync(self._pool, self._metadata, request), request, context)

    def _metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest):
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        spec = ModelSpec.from_proto(request.model_spec)
        version, signature_map = self._dataplane.signature_def_map(spec, list(request.metadata_field))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=version))
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response

    async def Classify(self, request: classification_pb2.ClassificationRequest, context):
        timeout_ms = _session_timeout_ms(context.time_remaining())
        return await _unary(run_sync(self._pool, self._classify, request, timeout_ms), request, context, "Classify")

    def _classify(self, request: classification_pb2.ClassificationRequest, timeout_ms: int):
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        spec = ModelSpec.from_proto(request.model_spec)
        version, key, result = self._dataplane.classify(spec, request.input, timeout_ms)
        return classification_pb2.ClassificationResponse(model_spec=_effective_spec(spec.name, version, key),
                                                         result=result)

    async def Regress(self, request: regression_pb2.RegressionRequest, context):
        timeout_ms = _session_timeout_ms(context.time_remaining())
        return await _unary(run_sync(self._pool, self._regress, request, timeout_ms), request, context, "Regress")

    def _regress(self, request: regression_pb2.RegressionRequest, timeout_ms: int):
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        spec = ModelSpec.from_proto(request.model_spec)
        version, key, result = self._dataplane.regress(spec, request.input, timeout_ms)
        return regression_pb2.RegressionResponse(model_spec=_effective_spec(spec.name, version, key), result=result)

    async def MultiInference(self, request: inference_pb2.MultiInferenceRequest, context):
        timeout_ms = _session_timeout_ms(context.time_remaining())
        return await _unary(run_sync(self._pool, self._multi_inference, request, timeout_ms), request, context)

    def _multi_inference(self, request: inference_pb2.MultiInferenceRequest, timeout_ms: int):
        tasks = [(ModelSpec.from_proto(task.model_spec), task.method_name) for task in request.tasks]
        version, results = self._dataplane.multi_inference(tasks, request.input, timeout_ms)
        response = inference_pb2.MultiInferenceResponse()
        for (spec, _), (key, method, result) in zip(tasks, results):
            entry = response.results.add(model_spec=_effective_spec(spec.name, version, key))
            if method == CLASSIFY_METHOD:
                entry.classification_result.CopyFrom(result)
            else:
                entry.regression_result.CopyFrom(result)
        return response


def _effective_spec(name: str, version: int, signature_name: str) -> model_pb2.ModelSpec:
    """The ModelSpec a response reports: the version that ran, the signature key used."""
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    spec.version.value = version
    return spec


def _version_status(status: VersionStatus) -> get_model_status_pb2.ModelVersionStatus:
    error = status.error
    return get_model_status_pb2.ModelVersionStatus(
        version=status.version,
        state=int(status.state),
        status=status_pb2.StatusProto(
            error_code=int(error.code) if error else 0,
            error_message=error.message if error else "",
        ),
    )


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServerCore, pool: ThreadPoolExecutor) -> None:
        self._core = core
        self._dataplane = core.dataplane
        self._pool = pool

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):
        return await _unary(run_sync(self._pool, self._status, request), request, context)

    def _status(self, request: get_model_status_pb2.GetModelStatusRequest):
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        spec = ModelSpec.from_proto(request.model_spec)
        statuses = self._dataplane.status(spec.name, spec.version)
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[_version_status(s) for s in statuses])

    async def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):
        return await _unary(run_sync(self._pool, self._reload, request), request, context)

    def _reload(self, request: model_management_pb2.ReloadConfigRequest) -> model_management_pb2.ReloadConfigResponse:
        if request.config.WhichOneof("config") != "model_config_list":
            raise invalid_argument("ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                                   "ModelConfigList is currently supported")
        for index, entry in enumerate(request.config.model_config_list.config):
            log.info("\nConfig entry\n\tindex : %d\n\tpath : %s\n\tname : %s\n\tplatform : %s",
                     index, entry.base_path, entry.name, entry.model_platform)
        try:
            self._core.reload(model_config.from_proto(request.config))
        except ServingError as exc:
            log.error("ReloadConfig failed: %s", exc.message)
            raise
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())


def add_services(server: grpc.aio.Server, core: ServerCore, pool: ThreadPoolExecutor, tensor_content: bool) -> None:
    for servicer, service in ((PredictionService(core.dataplane, pool, tensor_content),
                               prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]),
                              (ModelService(core, pool),
                               model_service_pb2.DESCRIPTOR.services_by_name["ModelService"])):
        server.add_generic_rpc_handlers((_handlers(servicer, service),))


class _Unparsable:
    """What a request that is not a valid serialized proto deserializes to."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _handlers(servicer, service) -> grpc.GenericRpcHandler:
    """The service's unary handlers, like the generated `add_*_to_server`, but bytes that do not parse
    as the request proto answer INVALID_ARGUMENT (gRPC's own deserializer would answer UNKNOWN)."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _reject_unparsable(getattr(servicer, method.name)),
            request_deserializer=functools.partial(_parse, request_class),
            response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _parse(request_class, data: bytes):
    try:
        return request_class.FromString(data)
    except message.DecodeError:
        return _Unparsable(request_class.DESCRIPTOR.full_name)


def _reject_unparsable(handler):
    @functools.wraps(handler)
    async def checked(request, context):
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Failed to parse the request as {request.type_name}")
        return await handler(request, context)
    return checked

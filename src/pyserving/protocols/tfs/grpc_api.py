"""TF Serving's gRPC API: tensorflow.serving.PredictionService and ModelService over the data plane.

A thin adapter: protos in, numpy through the data plane (Predict on the event
loop with the session call off it, the other methods on a worker thread), protos
out; `ServingError` becomes the RPC status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
    status_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from pyserving import metrics, tensors, tracing
from pyserving.concurrency import INLINE_BYTES, run_sized, run_sync
from pyserving.errors import INTERNAL_ERROR, Code, ServingError, invalid_argument
from pyserving.protocols.tfs.protos import effective_spec, model_spec, predict_response_bytes, version_status
from pyserving.runtimes.servable import CLASSIFY_METHOD
from pyserving.serving import DataPlane, ModelSpec, PredictResult
from pyserving.transports.grpc import Service, session_timeout_ms, unary_service

__all__ = ["ModelService", "PredictionService", "services"]

log = logging.getLogger("pyserving")

SIGNATURE_DEF_FIELD = "signature_def"
T = TypeVar("T")
_PREDICTION_SERVICE = "tensorflow.serving.PredictionService"  # a traced call's rpc.service


async def _unary(
    work: Awaitable[T],
    request: Any,
    context: grpc.aio.ServicerContext,
    api: str = "",
    dataplane: DataPlane | None = None,
    traced: str = "",
) -> T:
    """Await a handler's `work` on `request`; a ServingError becomes the RPC status.

    With `api` (Predict, Classify, Regress) and `dataplane` the call counts in request_count
    (a model that is not configured under one shared label) and, when it succeeds,
    request_latency, as in TF Serving. Those and `traced` (MultiInference, which has no request
    metrics) get a tracing span named after the method.
    """
    started = time.perf_counter()
    try:
        if (traced or api) and tracing.enabled:
            metadata = context.invocation_metadata()
            with tracing.grpc_span(traced or api, metadata, _PREDICTION_SERVICE, _model_name(request)):
                result = await work
        else:
            result = await work
    except ServingError as exc:
        _count(request, api, dataplane, exc.code, started)  # before the status leaves (a client may scrape next)
        await context.abort(exc.grpc_code, exc.grpc_message)
        raise  # abort raises; this keeps the type checker informed
    except Exception:  # a bug: logged once with its traceback; the client sees no Python details
        _count(request, api, dataplane, Code.INTERNAL, started)
        log.exception("Unexpected error handling %s", api or type(request).__name__)
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)
        raise
    _count(request, api, dataplane, Code.OK, started)
    return result


def _count(request: Any, api: str, dataplane: DataPlane | None, code: Code, started: float) -> None:
    """request_count (and, for an answer, request_latency) of an `api` call."""
    if not api or dataplane is None:
        return
    model = request.model_spec.name
    if code == Code.OK:  # a configured model answered
        metrics.REQUEST_COUNT.inc(model, code.name)
        metrics.REQUEST_LATENCY.observe(model, api, "GRPC", value=(time.perf_counter() - started) * 1e6)
    else:
        metrics.REQUEST_COUNT.inc(dataplane.metric_label(model), code.name)


def _model_name(request: Any) -> str:
    """The model an inference request names (a MultiInference request: its first task's)."""
    if isinstance(request, inference_pb2.MultiInferenceRequest):
        return request.tasks[0].model_spec.name if request.tasks else ""
    return str(request.model_spec.name)


def _spec(request: Any) -> ModelSpec:
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    return model_spec(request.model_spec)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, dataplane: DataPlane, pool: ThreadPoolExecutor, tensor_content: bool) -> None:
        self._dataplane = dataplane
        self._pool = pool
        self._tensor_content = tensor_content

    async def Predict(  # noqa: N802 (gRPC method name)
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        timeout_ms = session_timeout_ms(context.time_remaining())
        return await _unary(self._predict(request, timeout_ms), request, context, "Predict", self._dataplane)

    async def _predict(self, request: predict_pb2.PredictRequest, timeout_ms: int) -> bytes:
        """The hot path: tensors converted inline when small, the session call off the loop; the answer is
        the serialized PredictResponse, written directly (`predict_response_bytes`)."""
        spec = _spec(request)
        if request.ByteSize() > INLINE_BYTES:
            inputs = await run_sync(self._pool, tensors.to_ndarrays, request.inputs, self._dataplane.max_decoded_bytes)
        else:  # small, but a compact tensor (fewer values than its shape) expands: placed by its decoded size
            checked, size = tensors.checked_shapes(request.inputs, self._dataplane.max_decoded_bytes)
            inputs = await run_sized(self._pool, size, tensors.decode, checked)
        with self._dataplane.resolve(spec) as target:
            result = await self._dataplane.predict(
                target, spec.signature_name, inputs, list(request.output_filter), timeout_ms, self._pool
            )
        size = sum(array.nbytes for array in result.outputs.values())
        return await run_sized(self._pool, size, self._predict_response, result)

    def _predict_response(self, result: PredictResult) -> bytes:
        return predict_response_bytes(
            result.model, result.version, result.signature_name, result.outputs, self._tensor_content
        )

    async def GetModelMetadata(  # noqa: N802
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return await _unary(run_sync(self._pool, self._metadata, request), request, context)

    def _metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        spec = _spec(request)
        if not request.metadata_field:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                # TF Serving's message really reads like this (a literal "%s", name appended).
                raise invalid_argument(f"Metadata field %s is not supported{field}")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        with self._dataplane.resolve(spec) as target:
            signature_map = get_model_metadata_pb2.SignatureDefMap(signature_def=target.signature_defs)
            response.model_spec.name = spec.name
            response.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=target.version))
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response

    async def Classify(  # noqa: N802
        self, request: classification_pb2.ClassificationRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        timeout_ms = session_timeout_ms(context.time_remaining())
        return await _unary(
            run_sync(self._pool, self._classify, request, timeout_ms), request, context, "Classify", self._dataplane
        )

    def _classify(
        self, request: classification_pb2.ClassificationRequest, timeout_ms: int
    ) -> classification_pb2.ClassificationResponse:
        response = classification_pb2.ClassificationResponse()
        self._run_examples(self._dataplane.classify, request, timeout_ms, response)
        return response

    async def Regress(  # noqa: N802
        self, request: regression_pb2.RegressionRequest, context: grpc.aio.ServicerContext
    ) -> regression_pb2.RegressionResponse:
        timeout_ms = session_timeout_ms(context.time_remaining())
        return await _unary(
            run_sync(self._pool, self._regress, request, timeout_ms), request, context, "Regress", self._dataplane
        )

    def _regress(self, request: regression_pb2.RegressionRequest, timeout_ms: int) -> regression_pb2.RegressionResponse:
        response = regression_pb2.RegressionResponse()
        self._run_examples(self._dataplane.regress, request, timeout_ms, response)
        return response

    def _run_examples(self, run: Callable[..., tuple[str, Any]], request: Any, timeout_ms: int, response: Any) -> None:
        """Classify or Regress (`run`) into `response`: the effective ModelSpec and the result."""
        spec = _spec(request)
        with self._dataplane.resolve(spec) as target:
            key, result = run(target, spec.signature_name, request.input, timeout_ms)
        response.model_spec.CopyFrom(effective_spec(spec.name, target.version, key))
        response.result.CopyFrom(result)

    async def MultiInference(  # noqa: N802
        self, request: inference_pb2.MultiInferenceRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.MultiInferenceResponse:
        timeout_ms = session_timeout_ms(context.time_remaining())
        return await _unary(
            run_sync(self._pool, self._multi_inference, request, timeout_ms), request, context, traced="MultiInference"
        )

    def _multi_inference(
        self, request: inference_pb2.MultiInferenceRequest, timeout_ms: int
    ) -> inference_pb2.MultiInferenceResponse:
        tasks = [(model_spec(task.model_spec), task.method_name) for task in request.tasks]
        with self._dataplane.resolve(tasks[0][0] if tasks else ModelSpec("")) as target:
            results = self._dataplane.multi_inference(target, tasks, request.input, timeout_ms)
        response = inference_pb2.MultiInferenceResponse()
        for (spec, _), outcome in zip(tasks, results, strict=True):
            entry = response.results.add(model_spec=effective_spec(spec.name, target.version, outcome.signature_name))
            if outcome.method_name == CLASSIFY_METHOD:
                entry.classification_result.CopyFrom(outcome.result)
            else:
                entry.regression_result.CopyFrom(outcome.result)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        pool: ThreadPoolExecutor,
        reload_config: Callable[[model_server_config_pb2.ModelServerConfig], None],
    ) -> None:
        self._dataplane = dataplane
        self._pool = pool
        self._reload_config = reload_config

    async def GetModelStatus(  # noqa: N802
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return await _unary(run_sync(self._pool, self._status, request), request, context)

    def _status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = _spec(request)
        statuses = self._dataplane.status(spec.name, spec.version)
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=[version_status(s) for s in statuses])

    async def HandleReloadConfigRequest(  # noqa: N802
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        return await _unary(run_sync(self._pool, self._reload, request), request, context)

    def _reload(self, request: model_management_pb2.ReloadConfigRequest) -> model_management_pb2.ReloadConfigResponse:
        if request.config.WhichOneof("config") != "model_config_list":
            raise invalid_argument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                "ModelConfigList is currently supported"
            )
        for index, entry in enumerate(request.config.model_config_list.config):
            log.info(
                "\nConfig entry\n\tindex : %d\n\tpath : %s\n\tname : %s\n\tplatform : %s",
                index,
                entry.base_path,
                entry.name,
                entry.model_platform,
            )
        try:
            self._reload_config(request.config)
        except ServingError as exc:
            log.error("ReloadConfig failed: %s", exc.message)
            raise
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())


def services(prediction: PredictionService, model: ModelService) -> list[Service]:
    """PredictionService and ModelService, to mount on the gRPC transport."""
    return [
        unary_service(prediction, prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]),
        unary_service(model, model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]),
    ]

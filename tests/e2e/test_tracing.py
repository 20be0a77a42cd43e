"""OpenTelemetry tracing (`--enable_tracing`): the spans a real server exports over OTLP/gRPC to a receiver
this test runs, their parents from W3C traceparent (REST header, gRPC metadata), and nothing when off."""

from __future__ import annotations

import os
import secrets
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import HALF_PLUS_TWO, free_port, post, predict_request, wait_for
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from tensorflow_serving.apis import classification_pb2, inference_pb2, prediction_service_pb2_grpc

import pyserving

MODEL = "half_plus_two"
VERSION = 123
SERVER_KIND = 2  # SPAN_KIND_SERVER
STATUS_UNSET, STATUS_ERROR = 0, 2
PREDICT_ROUTE = "/v1/models/{model_name}[/versions/{version}|/labels/{label}]:predict"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on a free loopback port that keeps every span it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()

    def Export(self, request, context):  # noqa: N802 (the gRPC method)
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict, str, object]]:
        """(resource attributes, scope name, span) for every span received so far."""
        with self._lock:
            received = list(self.requests)
        return [
            (attributes(resource_spans.resource.attributes), scope_spans.scope.name, span)
            for request in received
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def span(self, trace_id: str, timeout: float = 20.0):
        """The one span of trace `trace_id` (hex), once it arrived."""
        wanted = bytes.fromhex(trace_id)
        found = wait_for(
            lambda: [entry for entry in self.spans() if entry[2].trace_id == wanted],
            timeout,
            f"a span of trace {trace_id}",
        )
        assert len(found) == 1, found
        return found[0]

    def stop(self) -> None:
        self._server.stop(None)


def attributes(pairs) -> dict:
    """OTLP KeyValues as a dict of Python values."""
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


def traceparent() -> tuple[str, str, str]:
    """(header value, trace id, parent span id) of a new sampled W3C trace context."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


def _start(start_server, receiver, *flags, ready=True, **env):
    """A half_plus_two server exporting to `receiver`; `env`: OTEL_* variables set for its process only."""
    settings = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    settings.update(env)
    with pytest.MonkeyPatch.context() as patch:
        for key in [key for key in os.environ if key.startswith("OTEL_")]:
            patch.delenv(key)
        for key, value in settings.items():
            patch.setenv(key, value)
        return start_server("--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", *flags, ready=ready)


@pytest.fixture(scope="module")
def traced(start_server, receiver, tmp_path_factory):
    """Tracing and batching on (a batch waits up to 2 ms; sizes padded to 2, 4 or 8)."""
    batching = tmp_path_factory.mktemp("tracing") / "batching.config"
    batching.write_text(
        "max_batch_size { value: 8 } batch_timeout_micros { value: 2000 } num_batch_threads { value: 1 } "
        "allowed_batch_sizes: 2 allowed_batch_sizes: 4 allowed_batch_sizes: 8"
    )
    return _start(
        start_server, receiver, "--enable_tracing", "--enable_batching", f"--batching_parameters_file={batching}"
    )


def check_queue_time(attrs: dict) -> None:
    queue_ms = attrs.pop("pyserving.queue.time_ms")
    assert isinstance(queue_ms, float) and 0.0 <= queue_ms < 10_000.0


def test_rest_predict_span_is_the_child_of_the_callers_span(traced, receiver):
    header, trace_id, parent_id = traceparent()
    r = post(
        f"{traced.rest}/v1/models/{MODEL}:predict",
        {"instances": [[1.0], [2.0], [5.0]]},
        headers={"traceparent": header},
    )
    assert r.status_code == 200 and r.json() == {"predictions": [[2.5], [3.0], [4.5]]}
    resource, scope, span = receiver.span(trace_id)
    assert resource["service.name"] == "pyserving"
    assert resource["service.version"] == pyserving.__version__
    assert scope == "pyserving"
    assert (span.name, span.kind, span.parent_span_id.hex()) == ("Predict", SERVER_KIND, parent_id)
    assert span.status.code == STATUS_UNSET
    attrs = attributes(span.attributes)
    check_queue_time(attrs)
    assert attrs == {
        "http.request.method": "POST",
        "http.route": PREDICT_ROUTE,
        "http.response.status_code": 200,
        "pyserving.model.name": MODEL,
        "pyserving.model.version": VERSION,
        "pyserving.signature": "serving_default",
        "pyserving.batch.size": 3,
        "pyserving.batch.run_size": 4,  # 3 rows padded to the allowed size 4
    }
    assert span.end_time_unix_nano > span.start_time_unix_nano > 0


def test_grpc_predict_span_takes_traceparent_from_metadata(traced, receiver):
    header, trace_id, parent_id = traceparent()
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(traced.grpc))
    response = stub.Predict(predict_request(values=(1.0, 2.0)), timeout=30, metadata=[("traceparent", header)])
    assert list(response.outputs["y"].float_val) == [2.5, 3.0]
    _, _, span = receiver.span(trace_id)
    assert (span.name, span.kind, span.parent_span_id.hex()) == ("Predict", SERVER_KIND, parent_id)
    attrs = attributes(span.attributes)
    check_queue_time(attrs)
    assert attrs == {
        "rpc.system": "grpc",
        "rpc.service": "tensorflow.serving.PredictionService",
        "rpc.method": "Predict",
        "rpc.grpc.status_code": 0,
        "pyserving.model.name": MODEL,
        "pyserving.model.version": VERSION,
        "pyserving.signature": "serving_default",
        "pyserving.batch.size": 2,
        "pyserving.batch.run_size": 2,
    }


def test_grpc_classify_on_a_worker_thread_keeps_the_span(traced, receiver):
    """Classify runs whole on a worker thread and waits there for its batch: the span is still annotated."""
    header, trace_id, parent_id = traceparent()
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL, "classify_x_to_y"
    for x in (1.0, 2.0):
        request.input.example_list.examples.add().features.feature["x"].float_list.value.append(x)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(traced.grpc))
    response = stub.Classify(request, timeout=30, metadata=[("traceparent", header)])
    assert [c.classes[0].score for c in response.result.classifications] == [2.5, 3.0]
    _, _, span = receiver.span(trace_id)
    assert (span.name, span.parent_span_id.hex()) == ("Classify", parent_id)
    attrs = attributes(span.attributes)
    check_queue_time(attrs)
    assert attrs["rpc.method"] == "Classify"
    assert attrs["pyserving.signature"] == "classify_x_to_y"
    assert (attrs["pyserving.batch.size"], attrs["pyserving.batch.run_size"]) == (2, 2)


def test_multi_inference_span(traced, receiver):
    header, trace_id, _ = traceparent()
    request = inference_pb2.MultiInferenceRequest()
    for signature in ("regress_x_to_y", "regress_x_to_y2"):
        task = request.tasks.add(method_name="tensorflow/serving/regress")
        task.model_spec.name, task.model_spec.signature_name = MODEL, signature
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(traced.grpc))
    response = stub.MultiInference(request, timeout=30, metadata=[("traceparent", header)])
    assert [r.regression_result.regressions[0].value for r in response.results] == [3.0, 4.0]
    _, _, span = receiver.span(trace_id)
    assert span.name == "MultiInference"
    assert attributes(span.attributes) == {  # unbatched, as in TF Serving: no queue time
        "rpc.system": "grpc",
        "rpc.service": "tensorflow.serving.PredictionService",
        "rpc.method": "MultiInference",
        "rpc.grpc.status_code": 0,
        "pyserving.model.name": MODEL,
        "pyserving.model.version": VERSION,
        "pyserving.signature": "regress_x_to_y,regress_x_to_y2",
        "pyserving.batch.size": 1,
    }


def test_v2_rest_and_grpc_infer_spans(traced, receiver):
    header, trace_id, parent_id = traceparent()
    body = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [1.0, 2.0]}]}
    r = post(f"{traced.rest}/v2/models/{MODEL}/versions/{VERSION}/infer", body, headers={"traceparent": header})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.5, 3.0]
    _, _, span = receiver.span(trace_id)
    assert (span.name, span.parent_span_id.hex()) == ("v2.infer", parent_id)
    attrs = attributes(span.attributes)
    check_queue_time(attrs)
    assert attrs == {
        "http.request.method": "POST",
        "http.route": "/v2/models/{model_name}[/versions/{model_version}]/infer",
        "http.response.status_code": 200,
        "pyserving.model.name": MODEL,
        "pyserving.model.version": VERSION,
        "pyserving.signature": "serving_default",
        "pyserving.batch.size": 2,
        "pyserving.batch.run_size": 2,
    }

    header, trace_id, parent_id = traceparent()
    infer_input = grpcclient.InferInput("x", [1, 1], "FP32")
    infer_input.set_data_from_numpy(np.array([[5.0]], np.float32))
    with grpcclient.InferenceServerClient(traced.grpc) as client:
        result = client.infer(MODEL, [infer_input], headers={"traceparent": header}, client_timeout=30)
    assert result.as_numpy("y").tolist() == [[4.5]]
    _, _, span = receiver.span(trace_id)
    assert (span.name, span.parent_span_id.hex()) == ("v2.infer", parent_id)
    attrs = attributes(span.attributes)
    check_queue_time(attrs)
    assert attrs == {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0,
        "pyserving.model.name": MODEL,
        "pyserving.model.version": VERSION,
        "pyserving.signature": "serving_default",
        "pyserving.batch.size": 1,
        "pyserving.batch.run_size": 2,
    }


def test_failed_requests_end_their_spans_with_status_error(traced, receiver):
    header, trace_id, parent_id = traceparent()
    r = post(f"{traced.rest}/v1/models/nope:predict", {"instances": [[1.0]]}, headers={"traceparent": header})
    assert r.status_code == 404
    assert r.json() == {"error": "Servable not found for request: Latest(nope)"}
    _, _, span = receiver.span(trace_id)
    assert (span.name, span.parent_span_id.hex()) == ("Predict", parent_id)
    assert (span.status.code, span.status.message) == (STATUS_ERROR, "Servable not found for request: Latest(nope)")
    assert attributes(span.attributes) == {
        "http.request.method": "POST",
        "http.route": PREDICT_ROUTE,
        "http.response.status_code": 404,
        "pyserving.model.name": "nope",
        "pyserving.status.code": "NOT_FOUND",
    }

    header, trace_id, _ = traceparent()
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(traced.grpc))
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(predict_request(signature_name="nope"), timeout=30, metadata=[("traceparent", header)])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == 'Serving signature key "nope" not found.'
    _, _, span = receiver.span(trace_id)
    assert (span.status.code, span.status.message) == (STATUS_ERROR, 'Serving signature key "nope" not found.')
    attrs = attributes(span.attributes)
    assert (attrs["rpc.grpc.status_code"], attrs["pyserving.status.code"]) == (9, "FAILED_PRECONDITION")
    assert (attrs["pyserving.model.version"], attrs["pyserving.signature"]) == (VERSION, "nope")


def test_a_request_without_traceparent_starts_a_trace_and_metadata_calls_are_not_traced(traced, receiver):
    before = len(receiver.spans())
    assert requests.get(f"{traced.rest}/v1/models/{MODEL}", timeout=10).status_code == 200
    assert requests.get(f"{traced.rest}/v1/models/{MODEL}/metadata", timeout=10).status_code == 200
    r = post(f"{traced.rest}/v1/models/{MODEL}:predict", {"instances": [[1.0]]})
    assert r.status_code == 200
    found = wait_for(lambda: receiver.spans()[before:], 20, "the predict span")
    time.sleep(0.5)  # a span for the status or metadata call would have left with it (50 ms export delay)
    spans = [span for _, _, span in receiver.spans()[before:]]
    assert [span.name for span in spans] == ["Predict"], found
    assert spans[0].parent_span_id == b""


def test_tracing_off_exports_nothing(start_server):
    receiver = Receiver()
    try:
        server = _start(start_server, receiver)
        header, _, _ = traceparent()
        assert (
            post(
                f"{server.rest}/v1/models/{MODEL}:predict", {"instances": [[1.0]]}, headers={"traceparent": header}
            ).status_code
            == 200
        )
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.grpc))
        stub.Predict(predict_request(), timeout=30, metadata=[("traceparent", header)])
        time.sleep(2.0)  # 40 times the export delay the server would use
        assert receiver.spans() == []
        assert "Tracing on" not in server.output()
    finally:
        receiver.stop()


def test_spans_queued_at_sigterm_are_exported_before_exit(start_server):
    """A 60 s export delay: the span leaves only because the shutdown flushes it; OTEL_SERVICE_NAME applies."""
    receiver = Receiver()
    try:
        server = _start(
            start_server,
            receiver,
            "--enable_tracing",
            OTEL_BSP_SCHEDULE_DELAY="60000",
            OTEL_SERVICE_NAME="fleet-a",
            OTEL_TRACES_SAMPLER="always_on",
        )
        header, trace_id, _ = traceparent()
        r = post(f"{server.rest}/v1/models/{MODEL}:predict", {"instances": [[1.0]]}, headers={"traceparent": header})
        assert r.status_code == 200
        time.sleep(1.0)
        assert receiver.spans() == []
        assert server.stop() == 0
        resource, _, span = receiver.span(trace_id, timeout=1.0)  # already there: it left before the exit
        assert resource["service.name"] == "fleet-a"
        assert "pyserving.queue.time_ms" not in attributes(span.attributes)  # no batching
        assert (
            "Tracing on: service fleet-a, exporter OTLPSpanExporter, sampler AlwaysOnSampler"
            in server.log_path.read_text()
        )
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "Failed to start server. Error: INVALID_ARGUMENT: OTEL_TRACES_EXPORTER=zipkin: pyserving exports to "
            "one of otlp, console",
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "Failed to start server. Error: INVALID_ARGUMENT: OTLP protocol 'http/json': pyserving exports over grpc "
            "or http/protobuf",
        ),
    ],
)
def test_unusable_otel_settings_stop_the_start(start_server, receiver, env, message):
    server = _start(start_server, receiver, "--enable_tracing", ready=False, **env)
    assert server.proc.wait(60) == 255
    assert message in server.output()


def test_console_exporter_prints_the_spans(start_server, receiver):
    server = _start(start_server, receiver, "--enable_tracing", OTEL_TRACES_EXPORTER="console")
    header, trace_id, _ = traceparent()
    r = post(f"{server.rest}/v1/models/{MODEL}:predict", {"instances": [[1.0]]}, headers={"traceparent": header})
    assert r.status_code == 200
    assert server.stop() == 0
    log = server.log_path.read_text()
    assert "Tracing on: service pyserving, exporter ConsoleSpanExporter, sampler ParentBased" in log
    assert '"name": "Predict"' in log and f'"trace_id": "0x{trace_id}"' in log
    assert all(span.trace_id.hex() != trace_id for _, _, span in receiver.spans())  # printed, not sent

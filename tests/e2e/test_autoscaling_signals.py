"""Autoscaling signals end to end: requests in flight per model over TF REST, TF gRPC, V2 REST and V2 gRPC,
batch queue depth and queueing time, on `--metrics_path` and the monitoring path; the flag off, alone,
and colliding with a served route.

The model is pure Python: its functions wait while a `hold` file exists, so requests stay in flight (and,
for the batched signature behind a held batch thread, in the queue) exactly as long as the test wants.
"""

from __future__ import annotations

import concurrent.futures
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tritonclient.grpc as grpcclient
from helpers import HALF_PLUS_TWO, post, run_cli, wait_for
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

MONITORING = "/monitoring/prometheus/metrics"
IN_FLIGHT = ':pyserving:requests_in_flight{model_name="gate"}'
DEPTH = ':pyserving:batch_queue_depth{model_name="gate"}'
QUEUED = ':pyserving:batch_queue_seconds_count{model_name="gate"}'
QUEUED_SUM = ':pyserving:batch_queue_seconds_sum{model_name="gate"}'
TF_QUEUED = ':tensorflow:serving:batching_session:queuing_latency_count{thread_pool_name="batch_threads"}'

GATE = """
    import os
    import time

    from pyserving import processing

    CONTROL = os.path.join(os.path.dirname(__file__), "..", "..", "control")


    def hold():
        open(os.path.join(CONTROL, "running"), "a").close()
        deadline = time.monotonic() + 30
        while os.path.exists(os.path.join(CONTROL, "hold")) and time.monotonic() < deadline:
            time.sleep(0.01)


    @processing.signature("serving_default", inputs={"x": ("float", [-1])}, outputs={"y": ("float", [-1])})
    def per_request(model, x):
        hold()
        return {"y": x + 1}


    @processing.signature(
        "batched", inputs={"x": ("float", [-1])}, outputs={"y": ("float", [-1])}, batched=True
    )
    def batched(model, x):
        hold()
        return {"y": x * 2}
"""


@pytest.fixture(scope="module")
def gate(start_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("autoscaling")
    (root / "gate" / "1").mkdir(parents=True)
    (root / "gate" / "1" / "processing.py").write_text(textwrap.dedent(GATE))
    (root / "control").mkdir()
    (root / "batching.config").write_text(
        "max_batch_size { value: 16 } batch_timeout_micros { value: 0 } "
        "max_enqueued_batches { value: 100 } num_batch_threads { value: 1 }"
    )
    (root / "monitoring.config").write_text("prometheus_config { enable: true }")
    server = start_server(
        "--model_name=gate",
        f"--model_base_path={root / 'gate'}",
        "--model_platform=python",
        "--enable_python_processing",
        "--python_processing_threads=8",
        "--enable_batching",
        f"--batching_parameters_file={root / 'batching.config'}",
        f"--monitoring_config_file={root / 'monitoring.config'}",
        "--metrics_path=/metrics",
    )
    server.control = root / "control"
    return server


class Held:
    """While the `with` block runs, the model's functions wait (up to 30 s); they finish when it ends."""

    def __init__(self, control: Path) -> None:
        self.hold, self.running = control / "hold", control / "running"

    def __enter__(self) -> Held:
        self.running.unlink(missing_ok=True)
        self.hold.touch()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.hold.unlink()


def samples(server, path: str = "/metrics") -> dict[str, float]:
    """Each sample of the exposition at `path`: `name{labels}` -> value."""
    response = requests.get(server.rest + path, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        key: float(value)
        for key, value in (line.rsplit(" ", 1) for line in response.text.splitlines() if line and line[0] != "#")
    }


def tf_rest(server, signature: str, xs: list[float]) -> list[float]:
    r = post(f"{server.rest}/v1/models/gate:predict", {"signature_name": signature, "instances": xs})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def tf_grpc(server, signature: str, xs: list[float], timeout: float = 30) -> list[float]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "gate"
    request.model_spec.signature_name = signature
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array(xs, np.float32)))
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
    return list(response.outputs["y"].float_val)


def v2_rest(server, signature: str, xs: list[float]) -> list[float]:
    body = {
        "parameters": {"signature_name": signature},
        "inputs": [{"name": "x", "shape": [len(xs)], "datatype": "FP32", "data": xs}],
    }
    r = post(f"{server.rest}/v2/models/gate/infer", body)
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"]


def v2_grpc(server, signature: str, xs: list[float]) -> list[float]:
    tensor = grpcclient.InferInput("x", [len(xs)], "FP32")
    tensor.set_data_from_numpy(np.array(xs, np.float32))
    with grpcclient.InferenceServerClient(server.grpc) as client:
        result = client.infer("gate", [tensor], parameters={"signature_name": signature}, client_timeout=30)
    return result.as_numpy("y").tolist()


def test_requests_in_flight_count_every_protocol_on_both_paths(gate):
    assert samples(gate)[IN_FLIGHT] == 0.0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        with Held(gate.control):
            calls = [
                pool.submit(tf_rest, gate, "serving_default", [1.0]),
                pool.submit(tf_grpc, gate, "serving_default", [2.0]),
                pool.submit(v2_rest, gate, "serving_default", [3.0]),
                pool.submit(v2_grpc, gate, "serving_default", [4.0]),
            ]
            wait_for(lambda: samples(gate)[IN_FLIGHT] == 4.0, timeout=30, what="four requests in flight")
            time.sleep(0.2)
            for path in ("/metrics", MONITORING):  # one exposition on both paths
                assert samples(gate, path)[IN_FLIGHT] == 4.0
                assert samples(gate, path)[DEPTH] == 0.0  # the per-request signature is not batched
        assert [call.result(30) for call in calls] == [[2.0], [3.0], [4.0], [5.0]]
    assert samples(gate)[IN_FLIGHT] == 0.0


def test_batch_queue_depth_and_queueing_time_behind_a_held_batch(gate):
    before = samples(gate)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        with Held(gate.control) as held:
            first = pool.submit(tf_rest, gate, "batched", [0.0])
            wait_for(held.running.exists, timeout=30, what="the first batch to run")  # the one batch thread
            queued = [
                pool.submit(tf_rest, gate, "batched", [1.0, 2.0]),
                pool.submit(tf_grpc, gate, "batched", [3.0]),
                pool.submit(v2_rest, gate, "batched", [4.0]),
                pool.submit(v2_grpc, gate, "batched", [5.0]),
            ]
            wait_for(lambda: samples(gate)[DEPTH] == 5.0, timeout=30, what="five rows queued")
            time.sleep(0.3)  # each queued call waits at least this long
            during = samples(gate, MONITORING)
            assert (during[DEPTH], during[IN_FLIGHT]) == (5.0, 5.0)  # 5 rows queued; 4 calls queued + 1 running
            assert during[QUEUED] - before.get(QUEUED, 0.0) == 1.0  # only the first call has left its queue
        assert first.result(30) == [0.0]
        assert [call.result(30) for call in queued] == [[2.0, 4.0], [6.0], [8.0], [10.0]]
    after = samples(gate)
    assert (after[DEPTH], after[IN_FLIGHT]) == (0.0, 0.0)
    assert after[QUEUED] - before.get(QUEUED, 0.0) == 5.0  # one per call
    assert after[TF_QUEUED] - before.get(TF_QUEUED, 0.0) == 5.0  # TF Serving's per-pool histogram agrees
    assert after[QUEUED_SUM] - before.get(QUEUED_SUM, 0.0) >= 4 * 0.3


def test_a_call_cancelled_in_the_queue_leaves_in_flight_at_once_and_the_queue_when_reached(gate):
    before = samples(gate)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with Held(gate.control) as held:
            first = pool.submit(tf_rest, gate, "batched", [0.0])
            wait_for(held.running.exists, timeout=30, what="the first batch to run")
            with pytest.raises(grpc.RpcError) as late:
                tf_grpc(gate, "batched", [1.0, 2.0, 3.0], timeout=1)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: samples(gate)[IN_FLIGHT] == 1.0, timeout=10, what="the cancelled call to end")
            assert samples(gate)[DEPTH] == 3.0  # its rows wait for a batch thread to drop them
        assert first.result(30) == [0.0]
    wait_for(lambda: samples(gate)[DEPTH] == 0.0, timeout=10, what="the cancelled rows to be dropped")
    after = samples(gate)
    assert after[IN_FLIGHT] == 0.0
    assert after[QUEUED] - before.get(QUEUED, 0.0) == 1.0  # the dropped call never ran


def test_metrics_path_alone_and_off(start_server, half_plus_two):
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--metrics_path=/custom/metrics"
    )
    assert post(server.rest + "/v1/models/half_plus_two:predict", {"instances": [1.0]}).status_code == 200
    exposition = samples(server, "/custom/metrics")
    assert exposition[':tensorflow:serving:request_count{model_name="half_plus_two",status="OK"}'] == 1.0
    assert exposition[':pyserving:requests_in_flight{model_name="half_plus_two"}'] == 0.0
    assert not any(key.startswith(":pyserving:batch_queue_depth") for key in exposition)  # no batching
    for path in ("/metrics", MONITORING):
        assert requests.get(server.rest + path, timeout=10).status_code == 404
    for path in ("/metrics", MONITORING):  # neither flag: no metrics at all
        assert requests.get(half_plus_two.rest + path, timeout=10).status_code == 404


def test_a_colliding_metrics_path_fails_start_up():
    """Before any model loads (the other collisions and malformed paths: tests/unit/test_autoscaling_signals.py)."""
    result = run_cli("--model_name=m", f"--model_base_path={HALF_PLUS_TWO}", "--metrics_path=/v1/metrics", timeout=60)
    assert result.returncode == 255
    assert (
        "Failed to start server. Error: INVALID_ARGUMENT: --metrics_path=/v1/metrics collides with the REST API's "
        "/v1 paths; choose another path, e.g. /metrics\n"
    ) in result.stdout
    assert "Loading servable" not in result.stdout + result.stderr

"""Batching shared by REST and gRPC: exact per-caller results under concurrency, padding, splitting, queue limits."""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import HALF_PLUS_TWO, post, predict_request, run_cli
from models import export_busy_doubler
from tensorflow_serving.apis import prediction_service_pb2_grpc


def batching_file(tmp_path, text: str):
    path = tmp_path / "batching.config"
    path.write_text(text)
    return path


def monitoring_file(tmp_path):
    path = tmp_path / "monitoring.config"
    path.write_text("prometheus_config { enable: true }")
    return path


def metric(server, name: str) -> float:
    lines = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=10).text.splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{")
    )


@pytest.fixture(scope="module")
def batching_server(start_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching")
    config = batching_file(
        folder,
        "max_batch_size { value: 8 } batch_timeout_micros { value: 3000 } "
        "max_enqueued_batches { value: 1000 } num_batch_threads { value: 2 } "
        "allowed_batch_sizes: 2 allowed_batch_sizes: 4 allowed_batch_sizes: 8",
    )
    return start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--enable_batching=true",
        f"--batching_parameters_file={config}",
        f"--monitoring_config_file={monitoring_file(folder)}",
    )


def test_every_caller_gets_exactly_its_own_rows(batching_server):
    """Random request sizes from 1 to 4 rows, REST and gRPC at once, 48 in flight: every answer is the unbatched one."""
    rng = random.Random(7)
    plans = [
        (i, [float(rng.randint(-1000, 1000)) for _ in range(rng.randint(1, 4))], rng.random() < 0.5) for i in range(600)
    ]
    channel = grpc.insecure_channel(batching_server.grpc)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    runs_before = metric(batching_server, ":tensorflow:serving:batching_session:wrapped_run_count")

    def call(plan):
        _, xs, use_grpc = plan
        if use_grpc:
            response = stub.Predict(predict_request(values=xs), timeout=30)
            return list(response.outputs["y"].float_val)
        r = requests.post(
            batching_server.rest + "/v1/models/half_plus_two:predict",
            data=json.dumps({"instances": [[x] for x in xs]}),
            timeout=30,
        )
        return [row[0] for row in r.json()["predictions"]]

    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(call, plans))
    channel.close()
    for (_, xs, _), answer in zip(plans, answers, strict=True):
        assert answer == [0.5 * x + 2 for x in xs]
    runs = metric(batching_server, ":tensorflow:serving:batching_session:wrapped_run_count") - runs_before
    assert runs < len(plans) * 0.8  # calls were really merged
    assert metric(batching_server, ":tensorflow:serving:batching_session:padding_size_count") > 0


def test_task_larger_than_max_batch_size(batching_server):
    r = post(batching_server.rest + "/v1/models/half_plus_two:predict", {"instances": [[1.0]] * 9})
    assert (r.status_code, r.json()) == (400, {"error": "Task size 9 is larger than maximum input batch size 8"})


def test_large_batch_splitting(start_server, tmp_path):
    config = batching_file(
        tmp_path,
        "max_batch_size { value: 64 } enable_large_batch_splitting { value: true } "
        "max_execution_batch_size { value: 4 } "
        "allowed_batch_sizes: 2 allowed_batch_sizes: 4",
    )
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--enable_batching",
        f"--batching_parameters_file={config}",
        f"--monitoring_config_file={monitoring_file(tmp_path)}",
    )
    xs = [float(i) for i in range(11)]
    r = post(server.rest + "/v1/models/half_plus_two:predict", {"instances": [[x] for x in xs]})
    assert r.json() == {"predictions": [[0.5 * x + 2] for x in xs]}
    lines = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=10).text
    assert ':tensorflow:serving:batching_session:processed_batch_size_bucket{le="4"} 3.0' in lines
    assert ":tensorflow:serving:batching_session:processed_batch_size_count 3.0" in lines


def test_full_queue_answers_unavailable(start_server, tmp_path):
    # Each call spins a few seconds of CPU: long enough that the six calls, released together, find the one
    # batch slot busy and the queue full; 3M iterations (two calls in a row: about 30 s) timed out under load.
    base = export_busy_doubler(tmp_path / "busy", iterations=1_000_000)
    config = batching_file(
        tmp_path, "max_batch_size { value: 1 } max_enqueued_batches { value: 1 } num_batch_threads { value: 1 }"
    )
    server = start_server(
        "--model_name=busy", f"--model_base_path={base}", "--enable_batching", f"--batching_parameters_file={config}"
    )
    barrier = threading.Barrier(6)

    def call(i):
        barrier.wait()
        return post(server.rest + "/v1/models/busy:predict", {"instances": [float(i)]})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(call, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes
    for i, r in enumerate(responses):
        if r.status_code == 200:
            assert r.json() == {"predictions": [2.0 * i]}
        else:
            assert r.json() == {"error": "The batch scheduling queue to which this task was submitted is full"}
    with grpc.insecure_channel(server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_request("busy")
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda _: _grpc_code(stub, request), range(6)))
    assert grpc.StatusCode.OK in outcomes and grpc.StatusCode.UNAVAILABLE in outcomes


def test_calls_cancelled_while_queued_do_not_stop_the_batcher(start_server, tmp_path):
    """A gRPC call whose deadline passes while it waits for its batch is cancelled; the batch
    threads must drop it and keep serving everyone else."""
    config = batching_file(
        tmp_path, "max_batch_size { value: 8 } batch_timeout_micros { value: 300000 } num_batch_threads { value: 1 }"
    )
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--enable_batching",
        f"--batching_parameters_file={config}",
    )
    with grpc.insecure_channel(server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(predict_request(values=[1.0]), timeout=0.05)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.4)  # the batch it was queued in comes due without it
        response = stub.Predict(predict_request(values=[1.0, 3.0]), timeout=10)
        assert list(response.outputs["y"].float_val) == [2.5, 3.5]
    assert post(server.rest + "/v1/models/half_plus_two:predict", {"instances": [[5.0]]}).json() == {
        "predictions": [[4.5]]
    }


def _grpc_code(stub, request) -> grpc.StatusCode:
    try:
        stub.Predict(request, timeout=60)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_per_model_batching_parameters(start_server, tmp_path):
    base = tmp_path / "m"
    shutil.copytree(HALF_PLUS_TWO, base)
    (base / "00000123" / "batching_params.pbtxt").write_text("max_batch_size { value: 2 }")
    config = batching_file(tmp_path, "max_batch_size { value: 8 }")
    server = start_server(
        "--model_name=m",
        f"--model_base_path={base}",
        "--enable_batching",
        f"--batching_parameters_file={config}",
        "--enable_per_model_batching_parameters=true",
    )
    assert post(server.rest + "/v1/models/m:predict", {"instances": [1.0, 2.0]}).json() == {"predictions": [2.5, 3.0]}
    r = post(server.rest + "/v1/models/m:predict", {"instances": [1.0, 2.0, 3.0]})
    assert (r.status_code, r.json()) == (400, {"error": "Task size 3 is larger than maximum input batch size 2"})


def test_bad_batching_parameters_fail_start_up(tmp_path):
    config = batching_file(tmp_path, "max_batch_size { value: 8 } allowed_batch_sizes: 2 allowed_batch_sizes: 4")
    result = run_cli(
        "--model_name=m",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--enable_batching",
        f"--batching_parameters_file={config}",
    )
    assert result.returncode == 255
    assert (
        "Failed to start server. Error: INVALID_ARGUMENT: Last entry in allowed_batch_sizes must match "
        "max_batch_size; last entry was 4; expected 8"
    ) in result.stdout

"""The Open Inference Protocol (KServe V2) with the server's operations around it: batching shared with TF
Serving's API, warmup, Prometheus metrics, gRPC over a Unix socket, TLS, and the drain after SIGTERM.

Three servers: `ops` (batching, monitoring, a warmed-up model, a Unix socket), `tls` and `draining`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import ssl
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from helpers import HALF_PLUS_TWO, assert_v2_error, grpc_predict, make_pki, post, ssl_config, write_config, write_warmup
from models import export_increment
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
from tritonclient.utils import InferenceServerException

# One batch thread; a batch waits up to 1 s for a second row: two calls that share a batch answer at once.
BATCHING = (
    "max_batch_size { value: 2 } batch_timeout_micros { value: 1000000 } "
    "max_enqueued_batches { value: 1000 } num_batch_threads { value: 1 }"
)
WARMUP_RECORDS = 2


def _warmup_record() -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "warm"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0, 2.0], np.float32)))
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(request)
    return log.SerializeToString()


@pytest.fixture(scope="module")
def ops(start_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2ops")
    export_increment(root / "warm")
    write_warmup(root / "warm" / "1", [_warmup_record()] * WARMUP_RECORDS)
    (root / "batching.config").write_text(BATCHING)
    (root / "monitoring.config").write_text("prometheus_config { enable: true }")
    config = write_config(
        root / "models.config",
        {"name": "half_plus_two", "path": HALF_PLUS_TWO},
        {"name": "warm", "path": root / "warm"},
    )
    server = start_server(
        f"--model_config_file={config}",
        "--enable_batching=true",
        f"--batching_parameters_file={root / 'batching.config'}",
        f"--monitoring_config_file={root / 'monitoring.config'}",
        f"--grpc_socket_path={root / 'grpc.sock'}",
    )
    server.root = root
    return server


def metrics(server) -> dict[str, float]:
    """Each sample line of the Prometheus page: `name{labels}` -> value."""
    text = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def http_x(values, datatype: str = "FP32") -> list[httpclient.InferInput]:
    array = np.array(values, np.float64 if datatype == "FP64" else np.float32)
    tensor = httpclient.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=False)
    return [tensor]


def grpc_x(values) -> list[grpcclient.InferInput]:
    array = np.array(values, np.float32)
    tensor = grpcclient.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return [tensor]


# -- batching ---------------------------------------------------------------------------------------------

BATCH_COUNT = ":tensorflow:serving:batching_session:processed_batch_size_count"
BATCH_SUM = ":tensorflow:serving:batching_session:processed_batch_size_sum"


def test_v2_and_tf_api_calls_share_a_batch(ops):
    before = metrics(ops)
    answers = {}

    def v2():
        with httpclient.InferenceServerClient(ops.rest.removeprefix("http://")) as client:
            answers["v2"] = client.infer("half_plus_two", http_x([[1.0]])).as_numpy("y").tolist()

    def tf_api():
        answers["tf"] = post(ops.rest + "/v1/models/half_plus_two:predict", {"instances": [[3.0]]}).json()

    started = time.monotonic()
    threads = [threading.Thread(target=v2), threading.Thread(target=tf_api)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    assert answers == {"v2": [[2.5]], "tf": {"predictions": [[3.5]]}}
    after = metrics(ops)
    # One batch of two rows: the V2 call's and the TF API call's (alone, each would wait out the 1 s timeout).
    assert (after[BATCH_COUNT] - before[BATCH_COUNT], after[BATCH_SUM] - before[BATCH_SUM]) == (1.0, 2.0)
    assert elapsed < 0.9


def test_v2_and_tf_api_answers_under_batching(ops):
    """40 one-row calls at once, over V2 REST and gRPC and the TF API's REST and gRPC: each gets its own row."""
    channel = grpc.insecure_channel(ops.grpc)
    v2_grpc = grpcclient.InferenceServerClient(ops.grpc)

    def call(i: int) -> float:
        x = float(i)
        kind = i % 4
        if kind == 0:  # tritonclient's HTTP client runs on gevent: one per thread
            with httpclient.InferenceServerClient(ops.rest.removeprefix("http://")) as http:
                return http.infer("half_plus_two", http_x([[x]])).as_numpy("y")[0, 0]
        if kind == 1:
            return v2_grpc.infer("half_plus_two", grpc_x([[x]])).as_numpy("y")[0, 0]
        if kind == 2:
            return post(ops.rest + "/v1/models/half_plus_two:predict", {"instances": [[x]]}).json()["predictions"][0][0]
        return grpc_predict(channel, "half_plus_two", x=[x]).outputs["y"].float_val[0]

    try:
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(call, range(40)))
    finally:
        channel.close()
        v2_grpc.close()
    assert answers == [0.5 * i + 2 for i in range(40)]


# -- warmup, metrics, Unix socket -----------------------------------------------------------------------------


def test_warmed_up_model_serves_v2(ops):
    path = ops.root / "warm" / "1" / "assets.extra" / "tf_serving_warmup_requests"
    assert f"Finished reading warmup data for model at {path}. Number of warmup records read: {WARMUP_RECORDS}." in (
        ops.output()
    )
    records = f':tensorflow:serving:model_warmup_records_read{{model_path="{ops.root / "warm" / "1"}",status="OK"}}'
    assert metrics(ops)[records] == WARMUP_RECORDS
    with httpclient.InferenceServerClient(ops.rest.removeprefix("http://")) as client:
        result = client.infer("warm", http_x([1.5, -1.0]))
    assert result.as_numpy("y").tolist() == [2.5, 0.0]


def test_metrics_count_v2_requests(ops):
    before = metrics(ops)
    with httpclient.InferenceServerClient(ops.rest.removeprefix("http://")) as http:
        for _ in range(2):
            assert http.infer("warm", http_x([1.0])).as_numpy("y").tolist() == [2.0]
        with pytest.raises(InferenceServerException) as error:
            http.infer("warm", http_x([1.0], "FP64"))
        assert (error.value.status(), error.value.message()) == (
            "400",
            "input 'x' has datatype FP64; the model expects FP32",
        )
    with grpcclient.InferenceServerClient(ops.grpc) as client:
        for _ in range(3):
            assert client.infer("warm", grpc_x([1.0])).as_numpy("y").tolist() == [2.0]
        with pytest.raises(InferenceServerException) as error:
            client.infer("nope", grpc_x([1.0]))
        assert_v2_error(error, "StatusCode.NOT_FOUND", "Servable not found for request: Latest(nope)")
    after = metrics(ops)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = ':tensorflow:serving:request_count{model_name="%s",status="%s"}'
    assert delta(count % ("warm", "OK")) == 5
    assert delta(count % ("warm", "INVALID_ARGUMENT")) == 1
    assert delta(count % ("", "NOT_FOUND")) == 1  # unknown names share one label, as on TF Serving's API
    latency = ':tensorflow:serving:request_latency_count{API="infer",entrypoint="%s",model_name="warm"}'
    assert (delta(latency % "REST"), delta(latency % "GRPC")) == (2, 3)


def test_grpc_over_unix_socket(ops):
    with grpcclient.InferenceServerClient(f"unix:{ops.root / 'grpc.sock'}") as client:
        assert client.is_server_ready() is True
        assert client.is_model_ready("warm") is True
        result = client.infer("warm", grpc_x([4.0, 5.0]), request_id="unix")
    assert (result.get_response().id, result.as_numpy("y").tolist()) == ("unix", [5.0, 6.0])


# -- TLS --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(start_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2tls")
    pki = make_pki(folder)
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        f"--ssl_config_file={ssl_config(folder / 'ssl.config', pki, client_verify=False)}",
        "--rest_api_enable_ssl=true",
    )
    server.pki = pki
    return server


def test_tls_http_clients(tls):
    url = f"127.0.0.1:{tls.rest_port}"
    with httpclient.InferenceServerClient(url, ssl=True, ssl_options={"ca_certs": tls.pki["ca_file"]}) as client:
        assert client.is_server_ready() is True
        assert client.infer("half_plus_two", http_x([[2.0]])).as_numpy("y").tolist() == [[3.0]]

    async def run():
        context = ssl.create_default_context(cafile=tls.pki["ca_file"])
        async with httpaio.InferenceServerClient(url, ssl=True, ssl_context=context) as client:
            return (await client.infer("half_plus_two", http_x([[4.0]]))).as_numpy("y").tolist()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == [[4.0]]
    # Plain HTTP gets no answer from the TLS listener.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{url}/v2/health/ready", timeout=5)


def test_tls_grpc_client(tls):
    with grpcclient.InferenceServerClient(tls.grpc, ssl=True, root_certificates=tls.pki["ca_file"]) as client:
        assert client.is_server_live() is True
        assert client.infer("half_plus_two", grpc_x([[6.0]])).as_numpy("y").tolist() == [[5.0]]
    with grpcclient.InferenceServerClient(tls.grpc) as plain:
        with pytest.raises(InferenceServerException) as error:
            plain.is_server_live(client_timeout=5)
    assert error.value.status() == "StatusCode.UNAVAILABLE"


# -- draining -------------------------------------------------------------------------------------------


def test_sigterm_makes_v2_not_ready_while_it_still_serves(start_server):
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--shutdown_delay_seconds=3"
    )
    url = server.rest.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as http, grpcclient.InferenceServerClient(server.grpc) as v2_grpc:
        assert http.is_server_ready() is True
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        r = requests.get(server.rest + "/v2/health/ready", timeout=5)
        assert (r.status_code, r.json()) == (400, {"ready": False})  # the protocol's 4xx for not ready
        assert http.is_server_ready() is False
        assert v2_grpc.is_server_ready() is False
        # The listeners still serve through the delay.
        assert http.is_server_live() is True
        assert http.infer("half_plus_two", http_x([[2.0]])).as_numpy("y").tolist() == [[3.0]]
        assert v2_grpc.infer("half_plus_two", grpc_x([[2.0]])).as_numpy("y").tolist() == [[3.0]]
    assert server.proc.wait(30) == 0

"""Operations: Prometheus metrics, health and readiness, graceful shutdown, TLS, CORS, body limits, entrypoint."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import requests
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    HALF_PLUS_TWO,
    Server,
    free_port,
    make_pki,
    post,
    predict_request,
    reload,
    run_cli,
    ssl_config,
    statuses,
    wait_for,
)
from models import export_kitchen
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def metric_lines(server, path="/monitoring/prometheus/metrics") -> list[str]:
    r = requests.get(server.rest + path, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text.splitlines()


def test_prometheus_metrics_after_known_traffic(start_server, tmp_path):
    config = tmp_path / "monitoring.config"
    shutil.copy(Path(HALF_PLUS_TWO).parent / "monitoring_config.txt", config)
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", f"--monitoring_config_file={config}"
    )
    for _ in range(3):
        assert post(server.rest + "/v1/models/half_plus_two:predict", {"instances": [1.0]}).status_code == 200
    assert post(server.rest + "/v1/models/nope:predict", {"instances": [1.0]}).status_code == 404
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert post(server.rest + "/v1/models/half_plus_two:regress", body).status_code == 200
    with grpc.insecure_channel(server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(2):
            stub.Predict(predict_request(), timeout=30)
    lines = metric_lines(server)
    assert ':tensorflow:serving:request_count{model_name="half_plus_two",status="OK"} 6.0' in lines
    assert ':tensorflow:serving:request_count{model_name="",status="NOT_FOUND"} 1.0' in lines  # "nope" is not served
    assert ("# TYPE :tensorflow:serving:request_latency histogram") in lines
    latency = ':tensorflow:serving:request_latency_count{API="%s",entrypoint="%s",model_name="half_plus_two"} %s'
    assert latency % ("predict", "REST", "3.0") in lines
    assert latency % ("regress", "REST", "1.0") in lines
    assert latency % ("Predict", "GRPC", "2.0") in lines
    assert (
        ':tensorflow:serving:runtime_latency_count{API="Predict",model_name="half_plus_two",runtime="TF1"} 5.0' in lines
    )
    # TF Serving's bucket layout: 10 us * 1.8^k, then +Inf.
    buckets = [line for line in lines if line.startswith(':tensorflow:serving:request_latency_bucket{API="Predict"')]
    assert [line.split('le="')[1].split('"')[0] for line in buckets][:4] == ["10", "18", "32.4", "58.32"]
    assert buckets[-1].startswith(
        ':tensorflow:serving:request_latency_bucket{API="Predict",entrypoint="GRPC",'
        'le="+Inf",model_name="half_plus_two"} 2.0'
    )
    assert ':tensorflow:serving:request_example_count_total{model="half_plus_two"} 2.0' in lines
    assert any(
        line.startswith(":tensorflow:cc:saved_model:load_attempt_count{model_path=")
        and line.endswith('00000123",status="success"} 1.0')
        for line in lines
    )
    assert any(line.startswith("process_resident_memory_bytes ") for line in lines)


def test_event_loop_lag_gauge(start_server, tmp_path):
    config = tmp_path / "monitoring.config"
    shutil.copy(Path(HALF_PLUS_TWO).parent / "monitoring_config.txt", config)
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", f"--monitoring_config_file={config}"
    )
    time.sleep(1.2)  # the gauge holds the worst lag of each second
    lines = metric_lines(server)
    assert "# TYPE :pyserving:event_loop_lag_seconds gauge" in lines
    [sample] = [line for line in lines if line.startswith(":pyserving:event_loop_lag_seconds ")]
    assert 0 <= float(sample.split()[1]) < 0.5


def test_unknown_model_names_share_one_metric_label(start_server, tmp_path):
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: true }")
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", f"--monitoring_config_file={config}"
    )
    for _ in range(2):
        assert post(server.rest + "/v1/models/half_plus_two:predict", {"instances": [1.0]}).status_code == 200
    for i in range(40):  # distinct names, up to 4 KB (a URL has to fit the HTTP parser's limit)
        name = f"unknown-{i}-" + "x" * (100 * i)
        assert post(f"{server.rest}/v1/models/{name}:predict", {"instances": [1.0]}).status_code == 404
    with grpc.insecure_channel(server.grpc, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(40):  # up to 1 MB each
            request = predict_request(name=f"unknown-{i}-" + "y" * (25_000 * i))
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as error:  # a served model's own errors keep its name
            stub.Predict(predict_request(version=999), timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    response = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=10)
    lines = response.text.splitlines()
    assert [line for line in lines if line.startswith(":tensorflow:serving:request_count")] == [
        ':tensorflow:serving:request_count{model_name="half_plus_two",status="OK"} 2.0',
        ':tensorflow:serving:request_count{model_name="",status="NOT_FOUND"} 80.0',
        ':tensorflow:serving:request_count{model_name="half_plus_two",status="NOT_FOUND"} 1.0',
    ]
    assert not any("unknown-" in line for line in lines)
    assert len(response.content) < 64 * 1024


def test_metrics_endpoint_default_path_and_disabled(start_server, tmp_path):
    (tmp_path / "default.config").write_text("prometheus_config { enable: true }")
    (tmp_path / "off.config").write_text('prometheus_config { enable: false path: "/metrics" }')
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        f"--monitoring_config_file={tmp_path / 'default.config'}",
    )
    assert any(
        line.startswith(":tensorflow:serving:request_count") or line.startswith("# TYPE")
        for line in metric_lines(server)
    )
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        f"--monitoring_config_file={tmp_path / 'off.config'}",
    )
    assert requests.get(server.rest + "/metrics", timeout=10).status_code == 404


def test_health_readiness_and_grpc_health(start_server, tmp_path):
    empty = tmp_path / "later"
    empty.mkdir()
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "a" base_path: "{HALF_PLUS_TWO}" model_platform: "tensorflow" }} }}'
    )
    server = start_server(
        f"--model_config_file={config}", "--enable_grpc_healthcheck_service=true", "--file_system_poll_wait_seconds=1"
    )
    assert requests.get(server.rest + "/healthz", timeout=10).status_code == 200
    r = requests.get(server.rest + "/readyz", timeout=10)
    assert (r.status_code, r.json()) == (200, {"ready": True, "models": {"a": "AVAILABLE"}})
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tensorflow.serving.PredictionService", "ModelService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        # A configured model without a servable version makes the server not ready.
        reload(channel, {"name": "a", "path": HALF_PLUS_TWO}, {"name": "b", "path": empty})
    r = requests.get(server.rest + "/readyz", timeout=10)
    assert (r.status_code, r.json()) == (503, {"ready": False, "models": {"a": "AVAILABLE", "b": "NOT_AVAILABLE"}})
    shutil.copytree(Path(HALF_PLUS_TWO) / "00000123", empty / "1")
    wait_for(lambda: requests.get(server.rest + "/readyz", timeout=10).status_code == 200, what="b to load")


@pytest.fixture()
def kitchen(tmp_path) -> Path:
    return export_kitchen(tmp_path / "kitchen")


def slow_n(server) -> int:
    """A count for the kitchen's `slow` signature that takes about three seconds."""
    started = time.monotonic()
    post(server.rest + "/v1/models/kitchen:predict", {"signature_name": "slow", "inputs": {"n": 200_000}})
    return int(200_000 * 3.0 / max(time.monotonic() - started, 0.01))


def slow_grpc_request(n: int) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "kitchen"
    request.model_spec.signature_name = "slow"
    request.inputs["n"].CopyFrom(tf.make_tensor_proto(n, dtype=tf.int64))
    return request


def test_sigterm_drains_rest_and_grpc_requests_in_flight(start_server, kitchen):
    server = start_server("--model_name=kitchen", f"--model_base_path={kitchen}", "--enable_grpc_healthcheck_service")
    n = slow_n(server)
    results: dict = {}

    def rest():
        results["rest"] = post(
            server.rest + "/v1/models/kitchen:predict", {"signature_name": "slow", "inputs": {"n": n}}
        )

    def grpc_call():
        with grpc.insecure_channel(server.grpc) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            results["grpc"] = stub.Predict(slow_grpc_request(n), timeout=60)

    threads = [threading.Thread(target=rest), threading.Thread(target=grpc_call)]
    for thread in threads:
        thread.start()
    time.sleep(0.7)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Readiness is off and new connections are refused at once ...
    with pytest.raises(requests.ConnectionError):
        requests.get(server.rest + "/readyz", timeout=5)
    # ... while the requests already running complete.
    for thread in threads:
        thread.join(60)
    assert (results["rest"].status_code, results["rest"].json()) == (200, {"outputs": n})
    assert list(results["grpc"].outputs["count"].int64_val) == [n]
    assert server.proc.wait(30) == 0
    assert "Received shutdown signal" in server.output()


def test_second_signal_exits_at_once(start_server, kitchen):
    server = start_server("--model_name=kitchen", f"--model_base_path={kitchen}")
    slow = slow_request_in_flight(server, slow_n(server) * 3)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(30) == 128 + signal.SIGINT
    assert time.monotonic() - started < 5
    slow.join(60)


def test_grace_period_bounds_the_drain(start_server, kitchen):
    server = start_server("--model_name=kitchen", f"--model_base_path={kitchen}", "--shutdown_grace_period_seconds=1")
    slow = slow_request_in_flight(server, slow_n(server) * 4)  # about twelve seconds
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 8
    slow.join(60)


def slow_request_in_flight(server, n: int) -> threading.Thread:
    """A REST call of the `slow` signature, running on a thread; its outcome does not matter."""

    def call():
        try:
            post(server.rest + "/v1/models/kitchen:predict", {"signature_name": "slow", "inputs": {"n": n}})
        except requests.RequestException:
            pass

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.7)
    return thread


# -- TLS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_for_grpc_and_rest(start_server, tmp_path, pki):
    config = ssl_config(tmp_path / "ssl.config", pki, client_verify=False)
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        f"--ssl_config_file={config}",
        "--rest_api_enable_ssl=true",
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].encode())
    with grpc.secure_channel(server.grpc, credentials) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(), timeout=30)
    assert list(response.outputs["y"].float_val) == [2.5, 3.0, 4.5]
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as error:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    url = f"https://127.0.0.1:{server.rest_port}/v1/models/half_plus_two:predict"
    r = requests.post(url, data='{"instances": [1.0]}', verify=pki["ca_file"], timeout=30)
    assert r.json() == {"predictions": [2.5]}
    with pytest.raises(requests.ConnectionError):
        requests.post(url.replace("https", "http"), data='{"instances": [1.0]}', timeout=5)


def test_mutual_tls(start_server, tmp_path, pki):
    config = ssl_config(tmp_path / "ssl.config", pki, client_verify=True)
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        f"--ssl_config_file={config}",
        "--rest_api_enable_ssl=true",
    )
    with_client = grpc.ssl_channel_credentials(
        pki["ca"].encode(), pki["client_key"].encode(), pki["client_cert"].encode()
    )
    with grpc.secure_channel(server.grpc, with_client) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(), timeout=30)
    assert list(response.outputs["y"].float_val) == [2.5, 3.0, 4.5]
    without_client = grpc.ssl_channel_credentials(pki["ca"].encode())
    with grpc.secure_channel(server.grpc, without_client) as channel:
        with pytest.raises(grpc.RpcError) as error:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    url = f"https://127.0.0.1:{server.rest_port}/v1/models/half_plus_two"
    r = requests.get(url, verify=pki["ca_file"], cert=(pki["client_cert_file"], pki["client_key_file"]), timeout=30)
    assert r.status_code == 200
    # Without a client certificate the handshake fails (TLS 1.3 reports it as a dropped connection).
    with pytest.raises(requests.ConnectionError):
        requests.get(url, verify=pki["ca_file"], timeout=5)


def test_bad_ssl_config_fails_start_up(tmp_path):
    (tmp_path / "ssl.config").write_text("server_key: 12 oops")
    result = run_cli(
        "--model_name=m", f"--model_base_path={HALF_PLUS_TWO}", f"--ssl_config_file={tmp_path / 'ssl.config'}"
    )
    assert result.returncode == 255
    assert (
        f"Failed to start server. Error: INVALID_ARGUMENT: Invalid protobuf file: '{tmp_path / 'ssl.config'}'"
        in result.stdout
    )


def test_client_verify_without_a_ca_names_the_problem(tmp_path, pki):
    config = ssl_config(tmp_path / "ssl.config", {**pki, "ca": ""}, client_verify=True)
    result = run_cli("--model_name=m", f"--model_base_path={HALF_PLUS_TWO}", f"--ssl_config_file={config}")
    assert result.returncode == 255
    assert result.stdout.strip().splitlines()[-1] == (
        f"Failed to start server. Error: INVALID_ARGUMENT: {config}: client_verify is true but custom_ca is empty; "
        "client certificates cannot be verified without a CA"
    )
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("broken", ["server_cert", "server_key", "mismatched_key"])
def test_unusable_certificates_name_the_problem(tmp_path, pki, broken):
    values = dict(pki)
    if broken == "mismatched_key":
        values["server_key"] = pki["client_key"]
    else:
        values[broken] = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    config = ssl_config(tmp_path / "ssl.config", values, client_verify=False)
    result = run_cli("--model_name=m", f"--model_base_path={HALF_PLUS_TWO}", f"--ssl_config_file={config}")
    assert result.returncode == 255
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(
        f"Failed to start server. Error: INVALID_ARGUMENT: {config}: invalid server_cert, server_key or custom_ca ("
    ), last
    assert "Failed to bind" not in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_start_up_log_ends_with_tf_servings_event_loop_line(half_plus_two):
    lines = [line for line in half_plus_two.output().splitlines() if "HTTP/REST API" in line or "event loop" in line]
    assert lines[0].endswith("Exporting HTTP/REST API at:localhost:%d ..." % half_plus_two.rest_port)
    assert lines[1].endswith("NET_LOG: Entering the event loop ...")


# -- CORS and body limits -----------------------------------------------------------------------------


def test_cors_headers_and_preflight(start_server):
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--rest_api_enable_cors_support=true"
    )
    expected = {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "POST, GET",
        "access-control-allow-headers": "Content-Type",
    }
    r = requests.options(
        server.rest + "/v1/models/half_plus_two:predict", headers={"Origin": "http://example.com"}, timeout=10
    )
    assert (r.status_code, r.content) == (200, b"")
    assert {k: r.headers[k] for k in expected} == expected
    r = requests.options(server.rest + "/v1/models/half_plus_two:predict", timeout=10)
    assert (r.status_code, r.content) == (400, b"")
    for r in (
        post(server.rest + "/v1/models/half_plus_two:predict", {"instances": [1.0]}),
        requests.get(server.rest + "/v1/models/nope", timeout=10),
    ):
        assert {k: r.headers[k] for k in expected} == expected


def test_no_cors_headers_by_default(half_plus_two):
    r = post(half_plus_two.rest + "/v1/models/half_plus_two:predict", {"instances": [1.0]})
    assert "access-control-allow-origin" not in r.headers


def test_oversized_body_is_413_and_server_keeps_serving(start_server):
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--rest_api_max_body_bytes=1000"
    )
    r = post(server.rest + "/v1/models/half_plus_two:predict", '{"instances": [' + "1.0," * 400 + "1.0]}")
    assert (r.status_code, r.json()) == (413, {"error": "Request body exceeds the limit of 1000 bytes"})

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 200

    r = requests.post(server.rest + "/v1/models/half_plus_two:predict", data=chunks(), timeout=10)
    assert r.status_code == 413
    assert post(server.rest + "/v1/models/half_plus_two:predict", {"instances": [1.0]}).json() == {"predictions": [2.5]}


def test_gzip_bomb_is_refused(half_plus_two):
    bomb = gzip.compress(b" " * (101 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 1024 * 1024
    r = post(half_plus_two.rest + "/v1/models/half_plus_two:predict", bomb, headers={"Content-Encoding": "gzip"})
    assert (r.status_code, r.json()) == (
        400,
        {"error": "Request body exceeds 104857600 bytes after gzip decompression"},
    )


# -- container entrypoint -----------------------------------------------------------------------------


def test_entrypoint_serves_model_name_under_model_base_path_and_execs(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(HALF_PLUS_TWO, models / "half_plus_two")
    grpc_port, rest_port = free_port(), free_port()
    env = dict(
        os.environ,
        MODEL_NAME="half_plus_two",
        MODEL_BASE_PATH=str(models),
        PATH=f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
    )
    log = open(tmp_path / "entrypoint.log", "wb")
    proc = subprocess.Popen(
        [
            "bash",
            str(REPO / "docker" / "tf_serving_entrypoint.sh"),
            "--host=127.0.0.1",
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        server = Server.attach(proc, grpc_port, rest_port, tmp_path / "entrypoint.log")
        server.wait_ready()
        # exec: the server replaced the shell, so it is the process a container runtime signals.
        assert "tensorflow_model_server" in Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert statuses(server, "half_plus_two") == [(123, "AVAILABLE", "OK")]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_grpc_channel_arguments(start_server):
    server = start_server(
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--grpc_channel_arguments=grpc.max_connection_age_ms=60000,grpc.so_reuseport=0,broken",
    )
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(), timeout=30)
    assert list(response.outputs["y"].float_val) == [2.5, 3.0, 4.5]
    assert "Ignoring gRPC channel argument without '=': broken" in server.output()


def test_not_ready_before_the_initial_load(start_server, tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    server = start_server("--model_name=m", f"--model_base_path={base}", ready=False)
    time.sleep(3)  # the server is up, waiting for a version folder
    assert server.proc.poll() is None
    with pytest.raises(requests.ConnectionError):
        requests.get(server.rest + "/readyz", timeout=5)
    shutil.copytree(Path(HALF_PLUS_TWO) / "00000123", base / "1")
    server.wait_ready()
    assert requests.get(server.rest + "/readyz", timeout=10).json() == {"ready": True, "models": {"m": "AVAILABLE"}}

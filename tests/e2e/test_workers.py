"""`--num_workers`: protocol workers on the shared ports, one model process, the supervisor (docs/WORKERS.md).

Every test starts a real server with two workers and talks to it with real clients; processes are found
under the server's own pid (/proc) and only those are signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from helpers import (
    HALF_PLUS_TWO,
    MODELS,
    bad_model_start_error,
    children,
    free_port,
    grpc_predict,
    post,
    reload,
    rss_mib,
    run_cli,
    wait_for,
)
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

PREDICT = "/v1/models/half_plus_two:predict"


def _roles(pid: int) -> dict[str, int]:
    """The server's children by role: "model", "worker 0", "worker 1"..."""
    found = {}
    for child, cmdline in children(pid).items():
        parts = cmdline.split(b"\0")
        if b"pyserving.workers" in parts:
            found[" ".join(part.decode() for part in parts[parts.index(b"pyserving.workers") + 1 :] if part)] = child
    return found


def _start(start_server, *flags: str):
    """A server with two workers, both listening."""
    server = start_server("--num_workers=2", *flags)
    wait_for(lambda: server.output().count("NET_LOG: Entering the event loop") == 2, 60, "both workers listening")
    return server


def _ok_count(server) -> float:
    text = requests.get(server.rest + "/metrics", timeout=10).text
    line = ':tensorflow:serving:request_count{model_name="half_plus_two",status="OK"} '
    return float(next((row[len(line) :] for row in text.splitlines() if row.startswith(line)), "0"))


def test_two_workers_answer_rest_grpc_and_v2_with_the_model_loaded_once(start_server):
    server = _start(
        start_server,
        "--model_name=half_plus_two",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--enable_batching",
        "--metrics_path=/metrics",
    )
    roles = _roles(server.proc.pid)
    assert sorted(roles) == ["model", "worker 0", "worker 1"]
    for _ in range(10):  # a new connection each time: the kernel spreads them over both workers
        r = post(server.rest + PREDICT, {"instances": [1.0, 2.0, 5.0]})
        assert (r.status_code, r.json()) == (200, {"predictions": [2.5, 3.0, 4.5]})
        with grpc.insecure_channel(server.grpc) as channel:
            response = grpc_predict(channel, "half_plus_two", (1.0, 2.0, 5.0))
        assert list(response.outputs["y"].float_val) == [2.5, 3.0, 4.5]
        assert response.model_spec.version.value == 123
    v2 = post(
        server.rest + "/v2/models/half_plus_two/infer",
        {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [1, 2]}]},
    )
    assert v2.json()["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [2.5, 3.0]}]
    metadata = requests.get(server.rest + "/v1/models/half_plus_two/metadata", timeout=10).json()
    assert metadata["model_spec"] == {"name": "half_plus_two", "signature_name": "", "version": "123"}
    assert sorted(metadata["metadata"]["signature_def"]["signature_def"]) == [
        "classify_x_to_y",
        "regress_x2_to_y3",
        "regress_x_to_y",
        "regress_x_to_y2",
        "serving_default",
    ]
    status = requests.get(server.rest + "/v1/models/half_plus_two", timeout=10).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    # One merged scrape: the 23 calls (21 inferences, metadata, status) counted in whichever worker served them.
    assert _ok_count(server) == 23.0
    # TensorFlow and the model live in the model process only: a worker imports TF's protos, not TF.
    model_rss = rss_mib(roles["model"])
    for role in ("worker 0", "worker 1"):
        assert rss_mib(roles[role]) < 150 < model_rss, (role, rss_mib(roles[role]), model_rss)
    assert rss_mib(server.proc.pid) < 100  # the supervisor imports no TensorFlow either


def test_big_tensors_travel_in_shared_memory_and_leave_no_file(start_server):
    server = _start(start_server, "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}")
    run_dir = Path(
        next(
            entry.split("=", 1)[1]
            for entry in Path(f"/proc/{_roles(server.proc.pid)['model']}/environ").read_text().split("\0")
            if entry.startswith("PYSERVING_WORKERS_DIR=")
        )
    )
    values = np.arange(200_000, dtype=np.float32)  # 800 kB in and out: over the shared-memory threshold
    r = post(server.rest + PREDICT, {"instances": values.tolist()})
    assert r.status_code == 200
    np.testing.assert_array_equal(np.array(r.json()["predictions"], dtype=np.float32), values * 0.5 + 2)
    with grpc.insecure_channel(server.grpc, options=[("grpc.max_receive_message_length", 2**30)]) as channel:
        response = grpc_predict(channel, "half_plus_two", values)
    np.testing.assert_array_equal(np.array(response.outputs["y"].float_val, dtype=np.float32), values * 0.5 + 2)
    assert sorted(path.name for path in run_dir.iterdir()) == ["generation", "model.sock"]
    server.stop()
    assert not run_dir.exists()  # the supervisor removes its run directory


def test_a_reload_is_seen_at_once_by_every_worker(start_server):
    server = _start(start_server, "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}")
    with grpc.insecure_channel(server.grpc) as channel:
        reload(
            channel, {"name": "a", "path": HALF_PLUS_TWO}, {"name": "b", "path": MODELS / "saved_model_half_plus_three"}
        )
    for _ in range(10):  # new connections, so both workers answer: neither may still have the old config cached
        r = post(server.rest + "/v1/models/b:predict", {"instances": [1.0]})
        assert (r.status_code, r.json()) == (200, {"predictions": [3.5]})
        gone = post(server.rest + PREDICT, {"instances": [1.0]})
        assert gone.status_code == 404
        assert "Servable not found for request: Latest(half_plus_two)" in gone.json()["error"]
    r = requests.get(server.rest + "/readyz", timeout=10)
    assert r.json() == {"ready": True, "models": {"a": "AVAILABLE", "b": "AVAILABLE"}}


def test_a_refused_model_name_costs_the_model_process_nothing_until_the_models_change(start_server):
    server = _start(start_server, "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}")
    unknown = "/v1/models/nope:predict"
    for _ in range(20):  # new connections: both workers meet the refusal once
        r = post(server.rest + unknown, {"instances": [1.0]})
        assert (r.status_code, r.json()) == (404, {"error": "Servable not found for request: Latest(nope)"})
    model = _roles(server.proc.pid)["model"]
    os.kill(model, signal.SIGSTOP)  # a round trip now would wait for the model process
    try:
        for _ in range(10):
            started = time.monotonic()
            r = post(server.rest + unknown, {"instances": [1.0]})
            assert (r.status_code, time.monotonic() - started < 2.0) == (404, True)
    finally:
        os.kill(model, signal.SIGCONT)
    with grpc.insecure_channel(server.grpc) as channel:  # the model appears: no worker may keep refusing it
        reload(channel, {"name": "half_plus_two", "path": HALF_PLUS_TWO}, {"name": "nope", "path": HALF_PLUS_TWO})
    for _ in range(10):
        r = post(server.rest + unknown, {"instances": [1.0]})
        assert (r.status_code, r.json()) == (200, {"predictions": [2.5]})


def test_a_dead_worker_is_restarted_and_the_model_process_keeps_serving(start_server):
    server = _start(start_server, "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}")
    roles = _roles(server.proc.pid)
    os.kill(roles["worker 1"], signal.SIGKILL)
    wait_for(
        lambda: f"Worker 1 (pid {roles['worker 1']}) exited with code -9; restarting it" in server.output(),
        20,
        "the restart log line",
    )
    wait_for(lambda: server.output().count("NET_LOG: Entering the event loop") == 3, 60, "the new worker")
    again = _roles(server.proc.pid)
    assert again["model"] == roles["model"] and again["worker 0"] == roles["worker 0"]
    assert again["worker 1"] != roles["worker 1"]
    for _ in range(10):
        r = post(server.rest + PREDICT, {"instances": [1.0]})
        assert (r.status_code, r.json()) == (200, {"predictions": [2.5]})
    assert server.proc.poll() is None


def test_the_unix_socket_is_worker_0s_and_comes_back_with_it(start_server, tmp_path):
    path = tmp_path / "grpc.sock"
    server = _start(
        start_server, "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", f"--grpc_socket_path={path}"
    )
    assert server.output().count(f"Running gRPC ModelServer at UNIX socket {path}") == 1
    with grpc.insecure_channel(f"unix:{path}") as channel:
        assert list(grpc_predict(channel, "half_plus_two", (1.0,)).outputs["y"].float_val) == [2.5]
    first = _roles(server.proc.pid)["worker 0"]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: server.output().count("NET_LOG: Entering the event loop") == 3, 60, "worker 0 again")
    assert server.output().count(f"Running gRPC ModelServer at UNIX socket {path}") == 2
    with grpc.insecure_channel(f"unix:{path}") as channel:
        assert list(grpc_predict(channel, "half_plus_two", (1.0,)).outputs["y"].float_val) == [2.5]


def test_the_supervisor_may_be_pid_1_as_in_a_container(tmp_path):
    """In a container the server is pid 1: its children must not take a parent of pid 1 for a dead one."""
    if subprocess.run(["unshare", "-Urpf", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged user and pid namespaces here")
    rest, port = free_port(), free_port()
    log = (tmp_path / "server.log").open("wb")
    outer = subprocess.Popen(
        ["unshare", "-Urpf", sys.executable, "-m", "pyserving", "--num_workers=2", f"--port={port}",
         f"--rest_api_port={rest}", "--host=127.0.0.1", "--model_name=half_plus_two",
         f"--model_base_path={HALF_PLUS_TWO}", "--shutdown_delay_seconds=0"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: (tmp_path / "server.log").read_text().count("Entering the event loop") == 2, 90, "workers")
        r = post(f"http://127.0.0.1:{rest}{PREDICT}", {"instances": [1.0]})
        assert (r.status_code, r.json()) == (200, {"predictions": [2.5]})
        [supervisor] = children(outer.pid)  # pid 1 in its namespace
        namespace_pids = Path(f"/proc/{supervisor}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
        assert namespace_pids[-1] == "1"
        os.kill(supervisor, signal.SIGTERM)
        assert outer.wait(60) == 0
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
        log.close()


def test_the_model_process_dying_stops_the_server(start_server):
    server = _start(start_server, "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}")
    roles = _roles(server.proc.pid)
    os.kill(roles["model"], signal.SIGKILL)
    assert server.proc.wait(30) == 1
    assert f"The model process (pid {roles['model']}) exited with code -9; stopping the server" in server.output()
    time.sleep(0.5)
    for pid in roles.values():  # the workers are gone too
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_sigterm_drains_the_workers_then_stops_the_model_process(start_server):
    server = _start(start_server, "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}")
    roles = _roles(server.proc.pid)
    with grpc.insecure_channel(server.grpc) as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "half_plus_two"
        assert model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=10).model_version_status
    assert server.stop() == 0
    output = server.log_path.read_text()
    assert output.count("Server stopped") == 3  # each worker, then the supervisor
    assert "Model process stopped" in output
    assert output.index("I pyserving worker 0] Server stopped") < output.index("Model process stopped")
    for pid in roles.values():
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "INVALID_ARGUMENT: --num_workers=0 must be auto or a whole number from 1 to 1024"),
        ("many", "INVALID_ARGUMENT: --num_workers=many must be auto or a whole number from 1 to 1024"),
    ],
)
def test_a_bad_num_workers_fails_start_up(value, message):
    result = run_cli(
        f"--num_workers={value}", f"--model_base_path={HALF_PLUS_TWO}", "--port=0", "--grpc_socket_path=/x"
    )
    assert result.returncode == 255
    assert f"Failed to start server. Error: {message}" in result.stdout


def test_a_worker_that_cannot_start_stops_the_server_as_one_process_would_fail():
    taken = socket.socket()  # the gRPC port, held without SO_REUSEPORT: no worker can bind it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        result = run_cli(
            "--num_workers=2",
            "--host=127.0.0.1",
            f"--port={taken.getsockname()[1]}",
            f"--rest_api_port={free_port()}",
            "--model_name=half_plus_two",
            f"--model_base_path={HALF_PLUS_TWO}",
            timeout=120,
        )
    finally:
        taken.close()
    assert result.returncode == 255
    assert "Failed to start server. Error: " in result.stdout
    assert "could not start; stopping the server" in result.stderr
    assert "restarting it" not in result.stderr


def test_a_model_that_fails_to_load_fails_start_up_as_one_process_does(tmp_path):
    result = run_cli(
        "--num_workers=2",
        "--port=0",
        f"--grpc_socket_path={tmp_path / 'grpc.sock'}",
        "--model_name=bad",
        f"--model_base_path={MODELS / 'bad_half_plus_two'}",
        "--max_num_load_retries=0",
    )
    assert result.returncode == 255
    assert result.stdout.strip() == bad_model_start_error()
    assert "Starting 2 protocol workers" not in result.stderr

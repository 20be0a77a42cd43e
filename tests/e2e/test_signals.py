"""Signals: SIGTERM hands clients over without dropping requests; SIGHUP reloads the model config file."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import requests
from helpers import HALF_PLUS_TWO, predict_request, statuses, wait_for, write_config
from tensorflow_serving.apis import prediction_service_pb2_grpc

PREDICT = "/v1/models/half_plus_two:predict"


class _Senders:
    """Threads sending predicts back to back over REST (keep-alive sessions) and gRPC (one channel each),
    recording (protocol, started, outcome) for every request; `started` is wall-clock time, to compare
    with the server's log."""

    def __init__(self, server, per_protocol: int = 2) -> None:
        self.server = server
        self.results: list[tuple[str, float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rest, daemon=True) for _ in range(per_protocol)]
        self._threads += [threading.Thread(target=self._grpc, daemon=True) for _ in range(per_protocol)]
        self.connection_close = 0
        for thread in self._threads:
            thread.start()

    def _record(self, protocol: str, started: float, outcome: str) -> None:
        with self._lock:
            self.results.append((protocol, started, outcome))

    def _rest(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.time()
            try:
                r = session.post(self.server.rest + PREDICT, data='{"instances": [1.0]}', timeout=10)
                outcome = "ok" if (r.status_code, r.json()) == (200, {"predictions": [2.5]}) else f"{r.status_code}"
                if r.headers.get("connection") == "close":
                    self.connection_close += 1
            except requests.ConnectionError as exc:
                outcome = "refused" if "refused" in str(exc).lower() else f"error: {exc}"
                time.sleep(0.01)
            self._record("rest", started, outcome)

    def _grpc(self) -> None:
        with grpc.insecure_channel(self.server.grpc) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not self._stop.is_set():
                started = time.time()
                try:
                    response = stub.Predict(predict_request(values=(1.0,)), timeout=10)
                    outcome = "ok" if list(response.outputs["y"].float_val) == [2.5] else "wrong"
                except grpc.RpcError as exc:
                    unavailable = exc.code() == grpc.StatusCode.UNAVAILABLE
                    outcome = "refused" if unavailable else f"{exc.code()}: {exc.details()}"
                    time.sleep(0.01)
                self._record("grpc", started, outcome)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_sigterm_keeps_serving_through_the_drain_delay(start_server):
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--shutdown_delay_seconds=2"
    )
    senders = _Senders(server)
    try:
        time.sleep(0.5)
        signalled = time.time()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Not ready any more, while the listeners still accept and serve.
        ready = requests.get(server.rest + "/readyz", timeout=5)
        assert (ready.status_code, ready.json()["ready"]) == (503, False)
        assert server.proc.wait(30) == 0
        exited = time.time()
    finally:
        senders.stop()
    log = server.output()
    assert "closing the listeners in 2 s" in log
    closed = server.logged_at("Closing the listeners")  # logged just before it closes the listeners
    assert signalled + 1.9 < closed < exited

    during_delay = [r for r in senders.results if signalled + 0.1 < r[1] < signalled + 1.8]
    for protocol in ("rest", "grpc"):
        outcomes = [outcome for p, _, outcome in during_delay if p == protocol]
        assert outcomes and set(outcomes) == {"ok"}, (protocol, outcomes)
    # During the delay every REST response closed its connection, handing the client over.
    assert senders.connection_close > 0
    # No request sent before the listeners closed failed. `started` is taken before the client library
    # connects, so a request that started a millisecond before the logged close may still reach a closed
    # listener: "refused" (ECONNREFUSED, or gRPC's UNAVAILABLE: the server never took the call, and
    # retrying is safe) is never a dropped request. One known gRPC window remains: a call that reached
    # gRPC's core in the last milliseconds before the close, and was not yet handed to a handler, is
    # CANCELLED by grpcio's shutdown (seen 1.2 ms before the close). docs/RELIABILITY.md.
    before_close = [(p, round(t - signalled, 4), o) for p, t, o in senders.results if t < closed]
    in_grpc_window = [r for r in before_close if r[0] == "grpc" and r[2] == "StatusCode.CANCELLED: CANCELLED"]
    assert all(closed - signalled - r[1] < 0.005 for r in in_grpc_window), in_grpc_window
    failures = [r for r in before_close if r[2] not in ("ok", "refused") and r not in in_grpc_window]
    assert failures == [], round(closed - signalled, 4)
    assert len(before_close) > 20


def test_sighup_reloads_the_model_config_file(start_server, tmp_path):
    config = tmp_path / "models.config"
    write_config(config, {"name": "first", "path": HALF_PLUS_TWO})
    server = start_server(f"--model_config_file={config}")
    assert statuses(server, "first") == [(123, "AVAILABLE", "OK")]
    write_config(config, {"name": "first", "path": HALF_PLUS_TWO}, {"name": "second", "path": HALF_PLUS_TWO})
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: statuses(server, "second") == [(123, "AVAILABLE", "OK")], what="the second model")
    assert statuses(server, "first") == [(123, "AVAILABLE", "OK")]
    assert server.proc.poll() is None
    assert "SIGHUP: reloading " + str(config) in server.output()


def test_sighup_without_a_config_file_is_logged_and_ignored(half_plus_two):
    half_plus_two.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP ignored" in half_plus_two.output(), what="the SIGHUP log line")
    assert half_plus_two.proc.poll() is None
    r = requests.post(half_plus_two.rest + PREDICT, data='{"instances": [1.0]}', timeout=10)
    assert r.json() == {"predictions": [2.5]}

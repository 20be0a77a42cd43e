"""What the tests share: the server as a subprocess, requests in both protocols, config files, waiting.

Test modules import from here (and from `models`), never from each other.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import requests
import tensorflow as tf
import tf_serving_models
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import text_format
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

START_TIMEOUT_S = 90
# PYSERVING_TEST_NUM_WORKERS=N runs every test's server with --num_workers=N (docs/WORKERS.md); a test that
# passes its own --num_workers wins (the last repeat of a flag does).
_NUM_WORKERS = (
    [f"--num_workers={os.environ['PYSERVING_TEST_NUM_WORKERS']}"]
    if os.environ.get("PYSERVING_TEST_NUM_WORKERS")
    else []
)
# What the server logs while it waits for a base path that does not exist (TF Serving waits too).
_MISSING_MODEL = "Could not find base path"


def _shared_testdata() -> Path | None:
    """TF Serving's own test files, when a `shared/` folder sits beside the checkout (the cross-check tier only)."""
    path = Path(
        os.environ.get("PYSERVING_TESTDATA", Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tf_serving")
    )
    return path if path.is_dir() else None


SHARED_TESTDATA = _shared_testdata()


@functools.cache
def _exported_models() -> Path:
    """The tests' copy of TF Serving's test models, exported once per test process (a few seconds)."""
    root = Path(tempfile.mkdtemp(prefix="pyserving-test-models-"))
    atexit.register(shutil.rmtree, root, True)
    return tf_serving_models.export_testdata(root)


def __getattr__(name: str) -> Path:
    """`MODELS` (a tree laid out like TF Serving's testdata folder) and `HALF_PLUS_TWO` (its TF1
    half_plus_two base path) are exported on first use, so tests that need no model pay nothing."""
    if name == "MODELS":
        return _exported_models()
    if name == "HALF_PLUS_TWO":
        return _exported_models() / "saved_model_half_plus_two_cpu"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """A pyserving process; `rest` is its base URL, `grpc` its gRPC target."""

    def __init__(self, *args: str, log_path: Path, rest: bool = True) -> None:
        grpc_port, rest_port = free_port(), free_port() if rest else 0
        command = [
            sys.executable,
            "-m",
            "pyserving",
            "--host=127.0.0.1",
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
            # Tests stop servers at once; the drain delay has tests of its own (which pass the flag again).
            "--shutdown_delay_seconds=0",
            *_NUM_WORKERS,
            *args,
        ]
        log = open(log_path, "wb")
        self._attach(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), grpc_port, rest_port, log_path, log
        )

    @classmethod
    def attach(cls, proc: subprocess.Popen, grpc_port: int, rest_port: int, log_path: Path) -> Server:
        """A Server for a process started some other way (e.g. through the container entrypoint)."""
        server = cls.__new__(cls)
        server._attach(proc, grpc_port, rest_port, log_path, None)
        return server

    def _attach(self, proc, grpc_port: int, rest_port: int, log_path: Path, log) -> None:
        self.proc, self.grpc_port, self.rest_port, self.log_path, self._log = proc, grpc_port, rest_port, log_path, log
        self.rest = f"http://127.0.0.1:{rest_port}"
        self.grpc = f"127.0.0.1:{grpc_port}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S, model_may_be_missing: bool = False) -> Server:
        """Wait for both ports; fail at once, with the server's log, if it exited or (unless the test
        expects it) cannot find a model's base path."""
        deadline = time.monotonic() + timeout
        ports = [self.grpc_port] + ([self.rest_port] if self.rest_port else [])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if all(_port_open(p) for p in ports):
                return self
            if not model_may_be_missing and _MISSING_MODEL in self.output():  # it would wait forever
                raise RuntimeError(f"server cannot find its model:\n{self.output()}")
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def logged_at(self, text: str) -> float:
        """When (epoch seconds) the server first logged a line holding `text`, from the line's own stamp
        (`YYYY-MM-DD HH:MM:SS.mmm: `, local time): exact, where polling the log would see it late. With
        `--num_workers`, each worker logs its own line: the first is the earliest."""
        line = next(line for line in self.output().splitlines() if text in line)
        return datetime.datetime.strptime(line.split(": ")[0], "%Y-%m-%d %H:%M:%S.%f").timestamp()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode


def run_cli(*args, timeout=120, program: str = ""):
    """`python -m pyserving ARGS`, or with `program` an installed entry point (`tensorflow_model_server`)."""
    command = [str(Path(sys.executable).parent / program)] if program else [sys.executable, "-m", "pyserving"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


def predict_request(name="half_plus_two", values=(1.0, 2.0, 5.0), **spec) -> predict_pb2.PredictRequest:
    """A half_plus_two-style PredictRequest: `values` as x [n, 1]; spec keys: version, version_label, ..."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array(values, np.float32).reshape(-1, 1)))
    return request


def post(url: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url, data=data, timeout=30, **kwargs)


def call_latencies(server, done: Callable[[], bool]) -> tuple[list[float], list[float]]:
    """Seconds each of back-to-back REST and gRPC half_plus_two predicts took (alternating) until `done()`."""
    rest, grpc_times = [], []
    session = requests.Session()
    with grpc.insecure_channel(server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(predict_request(), timeout=10)
        while not done():
            started = time.monotonic()
            url = server.rest + "/v1/models/half_plus_two:predict"
            assert session.post(url, data='{"instances": [1.0]}', timeout=10).ok
            rest.append(time.monotonic() - started)
            started = time.monotonic()
            stub.Predict(predict_request(), timeout=10)
            grpc_times.append(time.monotonic() - started)
    return rest, grpc_times


def grpc_predict(channel, name: str, x=(1.0,), **spec) -> predict_pb2.PredictResponse:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        predict_request(name, x, **spec), timeout=30
    )


def config_text(*models: dict) -> str:
    """Text-format ModelServerConfig; each model: name, path, and optional raw `extra` text."""
    entries = "".join(
        f'  config {{ name: "{m["name"]}" base_path: "{m["path"]}" model_platform: "tensorflow" '
        f"{m.get('extra', '')} }}\n"
        for m in models
    )
    return "model_config_list {\n" + entries + "}\n"


def write_config(path: Path, *models: dict) -> Path:
    path.write_text(config_text(*models))
    return path


def reload(channel, *models: dict) -> model_management_pb2.ReloadConfigResponse:
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(config_text(*models), request.config)
    return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=120)


def statuses(server, name: str) -> list[tuple[int, str, str]]:
    r = requests.get(f"{server.rest}/v1/models/{name}", timeout=10)
    if r.status_code != 200:
        return []
    return [(int(s["version"]), s["state"], s["status"]["error_code"]) for s in r.json()["model_version_status"]]


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def copy_version(source: Path, base: Path, version: int) -> Path:
    """Copy a version folder in atomically (copy aside, then rename), as deploy scripts should."""
    staging = base.parent / f".staging-{version}"
    shutil.copytree(source, staging)
    target = base / str(version)
    os.rename(staging, target)
    return target


class Traffic:
    """Sends predict requests over REST and gRPC on two threads until stopped; counts failures."""

    def __init__(self, server, name: str) -> None:
        self.sent = 0
        self.failures: list[str] = []
        self.grpc_versions: list[int] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._rest, args=(server, name)),
            threading.Thread(target=self._grpc, args=(server, name)),
        ]
        for thread in self._threads:
            thread.start()

    def _rest(self, server, name):
        with requests.Session() as session:
            while not self._stop.is_set():
                r = session.post(f"{server.rest}/v1/models/{name}:predict", data='{"instances": [2.0]}', timeout=30)
                self.sent += 1
                if r.status_code != 200 or r.json() != {"predictions": [3.0]}:
                    self.failures.append(f"REST {r.status_code} {r.text}")

    def _grpc(self, server, name):
        with grpc.insecure_channel(server.grpc) as channel:
            while not self._stop.is_set():
                try:
                    response = grpc_predict(channel, name, x=[2.0])
                    self.grpc_versions.append(response.model_spec.version.value)
                    if list(response.outputs["y"].float_val) != [3.0]:
                        self.failures.append(f"gRPC wrong answer {response}")
                except grpc.RpcError as exc:
                    self.failures.append(f"gRPC {exc.code()} {exc.details()}")
                self.sent += 1

    def serving(self, version: int) -> bool:
        return bool(self.grpc_versions) and self.grpc_versions[-1] == version

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def write_warmup(version_dir: Path, records: list[bytes]) -> None:
    (version_dir / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(version_dir / "assets.extra" / "tf_serving_warmup_requests")) as writer:
        for record in records:
            writer.write(record)


def counter_warmup(signature: str = "incr_counter") -> bytes:
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.model_spec.name = "counter"
    log.predict_log.request.model_spec.signature_name = signature
    return log.SerializeToString()


def get_counter(server, name: str) -> float:
    """Over gRPC: REST cannot call a signature without inputs (TF Serving cannot either)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "get_counter"
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return tf.make_ndarray(response.outputs["output"])


def children(pid: int) -> dict[int, bytes]:
    """`pid`'s children: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found[int(entry.name)] = cmdline
    return found


def model_pid(server) -> int:
    """The process holding the models: the server's, or with `--num_workers` its model process."""
    for pid, cmdline in children(server.proc.pid).items():
        if b"pyserving.workers\0model" in cmdline:
            return pid
    return server.proc.pid


def server_rss_mib(server) -> float:
    """The server's RSS: with `--num_workers`, its processes' together (supervisor, model process, workers)."""
    workers = [pid for pid, cmdline in children(server.proc.pid).items() if b"pyserving.workers" in cmdline]
    return rss_mib(server.proc.pid) + sum(rss_mib(pid) for pid in workers)


def bad_model_start_error() -> str:
    """What a server prints when MODELS/bad_half_plus_two, its only model, fails to load (TF Serving's text)."""
    return (
        "Failed to start server. Error: UNKNOWN: 1 servable(s) did not become available: "
        "{{{name: bad version: 123} due to error: NOT_FOUND: Could not find SavedModel .pb or .pbtxt "
        f"at supplied export directory path: {_exported_models() / 'bad_half_plus_two' / '00000123'}}}, }}"
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def signature_def(method: str = "tensorflow/serving/predict", **inputs: int):
    """A SignatureDef with the given input aliases and DataType numbers (tensor names `alias:0`)."""
    from tensorflow.core.protobuf import meta_graph_pb2

    signature = meta_graph_pb2.SignatureDef(method_name=method)
    for alias, dtype in inputs.items():
        signature.inputs[alias].name = f"{alias}:0"
        signature.inputs[alias].dtype = dtype
    return signature


class DoublingServable:
    """A servable in plain numpy: signature `double` (x -> y = 2x, any shape); for in-process tests of what
    runs servables (batching, the manager, the data plane). It records the batch sizes it ran, and
    `gate` (when set) holds each run until released, so tests can make calls queue up."""

    runtime = "numpy"

    def __init__(self, gate: threading.Event | None = None) -> None:
        from tensorflow.core.framework import types_pb2

        self.signature_defs = {"double": signature_def(x=types_pb2.DT_FLOAT)}
        self.signature_defs["double"].outputs["y"].name = "y:0"
        self.signature_defs["double"].outputs["y"].dtype = types_pb2.DT_FLOAT
        self.runs: list[int] = []
        self.closed = False
        self._gate = gate

    def run(self, signature_name, inputs, output_aliases, timeout_ms):
        if self._gate is not None:
            self._gate.wait(10)
        self.runs.append(len(inputs["x"]))
        return [inputs["x"] * 2 for _ in output_aliases]

    def run_multi(self, tasks, inputs, timeout_ms):
        return [self.run(name, inputs, aliases, timeout_ms) for name, aliases in tasks]

    def close(self) -> None:
        self.closed = True


# -- TLS -----------------------------------------------------------------------------------------------


def _certificate(subject: str, key, issuer_name, issuer_key, ca: bool, server: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # Key identifiers and key usage: Python 3.13 verifies with VERIFY_X509_STRICT, which requires them.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def make_pki(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM text (keys
    `ca`, `server_key`, `server_cert`, `client_key`, `client_cert`) and as files in `folder` (the same keys
    with `_file`)."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyserving test CA")])
    ca = _certificate("pyserving test CA", ca_key, ca_name, ca_key, ca=True, server=False)
    pems = {
        "ca": _pem(ca),
        "server_key": _pem(server_key),
        "server_cert": _pem(_certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False, server=True)),
        "client_key": _pem(client_key),
        "client_cert": _pem(_certificate("client", client_key, ca_name, ca_key, ca=False, server=False)),
    }
    for name, text in list(pems.items()):
        (folder / f"{name}.pem").write_text(text)
        pems[f"{name}_file"] = str(folder / f"{name}.pem")
    return pems


def ssl_config(path: Path, pki: dict[str, str], client_verify: bool) -> Path:
    """An SSLConfig text proto (for `--ssl_config_file`) with `make_pki`'s server certificate."""
    text = (
        f"server_key: {_quote(pki['server_key'])}\nserver_cert: {_quote(pki['server_cert'])}\n"
        f"custom_ca: {_quote(pki['ca'])}\nclient_verify: {'true' if client_verify else 'false'}\n"
    )
    path.write_text(text)
    return path


def _quote(text: str) -> str:
    return '"' + text.replace("\n", "\\n") + '"'


# -- the Open Inference Protocol (KServe V2) through tritonclient ----------------------------------------------


def v2_http_input(name: str, array: np.ndarray, datatype: str, binary: bool = True):
    """A tritonclient.http InferInput holding `array` (raw with the binary extension, or JSON)."""
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def v2_grpc_input(name: str, array: np.ndarray, datatype: str):
    """A tritonclient.grpc InferInput holding `array` (sent as raw_input_contents)."""
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def assert_v2_error(exc_info, status: str, message: str) -> None:
    """A tritonclient InferenceServerException: HTTP status ("400") or gRPC code ("StatusCode.NOT_FOUND")."""
    assert (exc_info.value.status(), exc_info.value.message()) == (status, message)


def assert_v2_rest_error(response: requests.Response, status: int, message: str) -> None:
    assert response.headers["content-type"] == "application/json"
    assert (response.status_code, response.json()) == (status, {"error": message})


# -- object stores (tests/e2e/test_object_storage*.py) ------------------------------------------------------


class StoreEmulator:
    """A local object-store server (moto, gcp-storage-emulator, Azurite) started as a subprocess on
    `port`; ready once `probe_url` answers HTTP at all. `put(key, data)` and `delete(prefix)` are the
    subclass's, through that store's own client."""

    def __init__(self, command: list[str], port: int, probe_url: str, log_path: Path, cwd=None) -> None:
        self.port = port
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(probe_url, timeout=2)
                return
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{command[0]} did not start:\n{log_path.read_text()}") from None
                time.sleep(0.1)

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, prefix: str) -> None:
        raise NotImplementedError

    def upload(self, local: Path, prefix: str, only=None) -> None:
        """Put every file of `local` under `prefix`, saved_model.pb last (as a deploy script should)."""
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == "saved_model.pb", p))
        for path in files:
            name = path.relative_to(local).as_posix()
            if only is None or only(name):
                self.put(f"{prefix}/{name}", path.read_bytes())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def cached_versions(cache: Path) -> list[str]:
    """The version folders in a --model_cache_dir (one folder per model under it)."""
    return sorted(p.name for model in cache.iterdir() for p in model.iterdir()) if cache.is_dir() else []


def swap_and_roll_back(start_server, store: StoreEmulator, url: str, prefix: str, cache: Path, what: str) -> None:
    """Serve `url` (version 1 of half_plus_two uploaded under `prefix`) with 1 s polling and, under REST and
    gRPC traffic: a partial upload of version 2 is never loaded; the whole of it swaps in; deleting it rolls
    back to version 1; each step's cache folders come and go. Zero failed requests; prints the timings."""
    version = _exported_models() / "saved_model_half_plus_two_cpu" / "00000123"
    store.upload(version, f"{prefix}/1")
    server = start_server(
        "--model_name=m", f"--model_base_path={url}", f"--model_cache_dir={cache}", "--file_system_poll_wait_seconds=1"
    )
    assert statuses(server, "m") == [(1, "AVAILABLE", "OK")]
    assert cached_versions(cache) == ["1"]
    copied = next(cache.iterdir()) / "1"
    assert sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file()) == sorted(
        p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file()
    )
    traffic = Traffic(server, "m")
    try:
        wait_for(lambda: traffic.serving(1), what="traffic")
        # A partial upload (no saved_model.pb yet) is not loaded, however long it stays so.
        store.upload(version, f"{prefix}/2", only=lambda name: name != "saved_model.pb")
        time.sleep(3.5)
        assert statuses(server, "m") == [(1, "AVAILABLE", "OK")]
        assert cached_versions(cache) == ["1"]
        # The marker last: version 2 is complete, copied, loaded while 1 serves; then 1 unloads.
        store.upload(version, f"{prefix}/2", only=lambda name: name == "saved_model.pb")
        uploaded = time.monotonic()
        wait_for(lambda: (2, "AVAILABLE", "OK") in statuses(server, "m"), what="version 2")
        swap_s = time.monotonic() - uploaded
        wait_for(lambda: statuses(server, "m") == [(2, "AVAILABLE", "OK"), (1, "END", "OK")], what="1 to unload")
        wait_for(lambda: traffic.serving(2), what="traffic on version 2")
        wait_for(lambda: cached_versions(cache) == ["2"], what="version 1's cache to go")
        # Rollback: deleting version 2 brings 1 back (copied again) before 2 unloads.
        store.delete(f"{prefix}/2")
        deleted = time.monotonic()
        wait_for(lambda: statuses(server, "m") == [(2, "END", "OK"), (1, "AVAILABLE", "OK")], what="rollback")
        rollback_s = time.monotonic() - deleted
        wait_for(lambda: traffic.serving(1), what="traffic on version 1 again")
        wait_for(lambda: cached_versions(cache) == ["1"], what="version 2's cache to go")
    finally:
        traffic.stop()
    print(
        f"\n{what} swaps: upload finished -> version 2 AVAILABLE {swap_s:.2f} s; delete -> version 1 AVAILABLE "
        f"{rollback_s:.2f} s; requests sent {traffic.sent}, failed {len(traffic.failures)}"
    )
    assert traffic.failures == []
    assert traffic.sent > 0
    assert server.stop() == 0
    assert cached_versions(cache) == ["1"]  # a restart reuses it


def store_outage_and_recovery(start_server, store: StoreEmulator, restart, scheme: str, tmp_path: Path, error: str):
    """A local model and `{scheme}://models/remote` (version 1 of half_plus_two) serve with 1 s polling; the
    store stops: both keep serving, the remote listing's `error` (the log's exact text after "with error ")
    is logged, a new local version loads within a few polls. `restart()` starts the store again on the same
    port (empty; it creates the bucket or container); versions 1 and 2 are uploaded again and remote
    version 2 loads. Returns the restarted store; prints the timings."""
    version = _exported_models() / "saved_model_half_plus_two_cpu" / "00000123"
    store.upload(version, "remote/1")
    local = tmp_path / "local"
    local.mkdir()
    (local / "1").symlink_to(version)
    config = write_config(
        tmp_path / "models.config",
        {"name": "local", "path": local},
        {"name": "remote", "path": f"{scheme}://models/remote"},
    )
    server = start_server(
        f"--model_config_file={config}", f"--model_cache_dir={tmp_path / 'cache'}", "--file_system_poll_wait_seconds=1"
    )
    assert statuses(server, "remote") == [(1, "AVAILABLE", "OK")]
    store.stop()
    stopped = time.monotonic()
    logged = (
        "FileSystemStoragePathSource encountered a filesystem access error: Could not list base path "
        f"{scheme}://models/remote for servable remote with error {error}"
    )
    wait_for(lambda: logged in server.output(), timeout=30, what="the listing error in the log")
    error_s = time.monotonic() - stopped
    (local / "2").symlink_to(version)
    added = time.monotonic()
    wait_for(lambda: (2, "AVAILABLE", "OK") in statuses(server, "local"), timeout=30, what="local version 2")
    local_s = time.monotonic() - added
    with grpc.insecure_channel(server.grpc) as channel:
        for name in ("local", "remote"):
            assert list(grpc_predict(channel, name, x=[2.0]).outputs["y"].float_val) == [3.0]
    assert statuses(server, "remote") == [(1, "AVAILABLE", "OK")]
    store = restart()
    store.upload(version, "remote/1")
    store.upload(version, "remote/2")
    uploaded = time.monotonic()
    wait_for(
        lambda: statuses(server, "remote") == [(2, "AVAILABLE", "OK"), (1, "END", "OK")],
        timeout=60,
        what="remote version 2 after the restart",
    )
    remote_s = time.monotonic() - uploaded
    with grpc.insecure_channel(server.grpc) as channel:
        response = grpc_predict(channel, "remote", x=[2.0])
        assert (response.model_spec.version.value, list(response.outputs["y"].float_val)) == (2, [3.0])
    print(
        f"\nstore stopped -> listing error logged {error_s:.2f} s; new local version AVAILABLE {local_s:.2f} s "
        f"after it appeared; store back -> remote version 2 AVAILABLE {remote_s:.2f} s after its upload"
    )
    assert server.stop() == 0
    return store

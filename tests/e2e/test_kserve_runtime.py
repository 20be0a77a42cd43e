"""pyserving started exactly as deploy/kserve's ServingRuntime starts it, as its pod would run it.

The command and arguments come from the manifest (KServe's kserve-tensorflow-serving ones, unchanged):
`{{.Name}}` becomes the InferenceService example's name, and only three values move for this host: the
ports (9000 and 8080 become free loopback ports, and `--host=127.0.0.1` is appended, as every test here
binds loopback only) and /mnt/models (a folder of the test's, in /tmp). `/usr/bin/tensorflow_model_server`
is what the image provides (docker/Dockerfile); here it is the same console script from the virtualenv.

The process runs as the pod's securityContext asks: uid and gid 1000, no supplementary groups, every
capability dropped (bounding set included), no new privileges (`setpriv`), HOME=/nonexistent as in the
image. It gets a private mount namespace (`unshare`): /tmp there is an empty tmpfs, as the pod's emptyDir
(holding only the test's folder), and, since this host's Python lives under /root (mode 0700), which uid
1000 cannot enter, such closed folders are a 0755 tmpfs holding only what Python needs (in the image,
Python is under /usr/local).

Then, as the kubelet would: TCP probes on both ports are refused until the model is loaded (the initial
load happens before any port opens), the readiness path answers, requests in both protocols over REST and
gRPC succeed, and SIGTERM with requests in flight (back to back, so in flight at SIGTERM and at the close)
drains: not ready at once, listeners closed after --shutdown_delay_seconds (default 5 s), in-flight requests
complete, new connections refused, exit 0 well within the pod's 30 s. Nothing is written to HOME, and only
Keras' config file to /tmp.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tritonclient.grpc as grpcclient
import yaml
from helpers import Server, free_port, post, v2_grpc_input
from models import export_kitchen
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = yaml.safe_load((ROOT / "deploy" / "kserve" / "servingruntime.yaml").read_text())
NAME = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())["metadata"]["name"]
UID = 1000
HOME = "/nonexistent"  # docker/Dockerfile's
POD_GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
KUBELET_PROBE_TIMEOUT_S = 1.0  # a probe's default timeoutSeconds
# What setpriv does with the securityContext (runAsUser/runAsGroup 1000, capabilities drop ALL,
# allowPrivilegeEscalation false).
SETPRIV = [
    "setpriv",
    f"--reuid={UID}",
    f"--regid={UID}",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
]

for tool in ("setpriv", "unshare", "mount"):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (util-linux) is not installed", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("switching to uid 1000 and making a mount namespace need root", allow_module_level=True)


def _closed_folders(paths: list[str]) -> dict[Path, set[str]]:
    """The folders on these paths that others may not enter (no o+x), each with the children on the paths."""
    closed: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        for folder in reversed(path.parents):
            if not folder.stat().st_mode & stat.S_IXOTH:
                closed.setdefault(folder, set()).add(path.relative_to(folder).parts[0])
                break
    return closed


# Where the namespace's bind mounts wait while a tmpfs covers their folder: a tmpfs over /mnt, in the
# namespace only (a folder every Linux has, and one the server does not use).
STAGE = Path("/mnt")


def _cover(folder: Path, keep: set[str], mode: str, staged: list[str]) -> list[str]:
    """Shell lines that mount a tmpfs (with `mode`) over `folder`, holding only bind mounts of `keep`."""
    lines, moves = [], []
    for child in sorted(keep):
        source, stage = folder / child, STAGE / str(len(staged))
        staged.append(str(source))
        make = "mkdir" if source.is_dir() else "touch"
        lines.append(f"{make} {stage} && mount --bind {shlex.quote(str(source))} {stage}")
        moves.append(f"{make} {shlex.quote(str(source))} && mount --bind {stage} {shlex.quote(str(source))}")
    return [*lines, f"mount -t tmpfs -o mode={mode} tmpfs {shlex.quote(str(folder))}", *moves]


TMP = Path("/tmp")


def _python_paths() -> list[str]:
    """What the server's Python needs to see: its interpreter, the virtualenv's scripts, sys.path."""
    return [os.path.realpath(sys.executable), str(Path(sys.executable).parent)] + [
        p for p in sys.path if p and os.path.exists(p)
    ]


def _kept_in_tmp(work: Path) -> set[str]:
    """The entries of /tmp the namespace keeps: the test's folder, and those holding Python's paths (a
    checkout or virtualenv under /tmp)."""
    paths = [work, *(Path(p) for p in _python_paths())]
    return {p.relative_to(TMP).parts[0] for p in paths if p.is_relative_to(TMP) and p != TMP}


def _namespace_script(work: Path) -> str:
    """Shell run as root in the new mount namespace: each closed folder becomes a 0755 tmpfs holding only
    what Python needs; /tmp becomes an empty tmpfs, as the pod's emptyDir (holding only the test's folder
    and, where the checkout is under /tmp, the checkout); then setpriv drops to the pod's user and execs "$@"."""
    staged: list[str] = []
    lines = ["set -e", f"mount -t tmpfs -o mode=0700 tmpfs {STAGE}"]
    for folder, children in sorted(_closed_folders(_python_paths()).items()):
        lines += _cover(folder, children, "0755", staged)
    lines += _cover(TMP, _kept_in_tmp(work), "1777", staged)
    lines.append("exec " + " ".join(SETPRIV) + ' -- "$@"')
    return "\n".join(lines)


def _runtime_command(grpc_port: int, rest_port: int, models: Path) -> list[str]:
    """The ServingRuntime's container command and args, with this host's three substitutions."""
    [container] = RUNTIME["spec"]["containers"]
    [program] = container["command"]
    assert program == "/usr/bin/tensorflow_model_server"  # the image's path (docker/Dockerfile)
    moved = {"--port=9000": f"--port={grpc_port}", "--rest_api_port=8080": f"--rest_api_port={rest_port}"}
    moved["--model_base_path=/mnt/models"] = f"--model_base_path={models}"
    args = [moved.get(arg, arg).replace("{{.Name}}", NAME) for arg in container["args"]]
    assert sum(arg not in container["args"] for arg in args) == 4  # the three above and {{.Name}}
    return [str(Path(sys.executable).parent / "tensorflow_model_server"), *args, "--host=127.0.0.1"]


def _tcp_probe(port: int) -> bool:
    """The kubelet's tcpSocket probe: success if a connection opens within the timeout."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=KUBELET_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _http_probe(url: str) -> int | None:
    """The kubelet's httpGet probe: the status (200-399 is success), None if no connection."""
    try:
        return requests.get(url, timeout=KUBELET_PROBE_TIMEOUT_S, allow_redirects=False).status_code
    except requests.ConnectionError:
        return None


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


class Pod:
    """The server process as the pod runs it, and what happened while it started."""

    def __init__(self, work: Path, kitchen: Path) -> None:
        self.work, self.models = work, work / "models"
        self.models.mkdir()
        grpc_port, rest_port = free_port(), free_port()
        self.command = _runtime_command(grpc_port, rest_port, self.models)
        # The image's environment: HOME names a folder that does not exist (and that uid 1000 cannot create).
        env = {k: v for k, v in os.environ.items() if k not in ("HOME", "TMPDIR")}
        env |= {"HOME": HOME, "PYTHONDONTWRITEBYTECODE": "1"}
        self._log = open(work / "server.log", "wb")  # closed in stop()
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _namespace_script(work), "sh"]
            + self.command,
            cwd=work,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.server = Server.attach(proc, grpc_port, rest_port, work / "server.log")
        try:
            self._start(kitchen)
        except BaseException:
            self.stop()
            raise

    def _start(self, kitchen: Path) -> None:
        proc, grpc_port, rest_port = self.server.proc, self.server.grpc_port, self.server.rest_port
        # Started, no model yet: the server waits for a version; the kubelet's probes find nothing listening.
        self.probes_before_load: list[tuple[bool, bool, int | None]] = []
        deadline = time.monotonic() + 30
        while "No versions of servable" not in self.server.output():
            assert proc.poll() is None and time.monotonic() < deadline, self.server.output()
            time.sleep(0.1)
        for _ in range(5):
            self.probes_before_load.append(
                (_tcp_probe(rest_port), _tcp_probe(grpc_port), _http_probe(self.server.rest + "/readyz"))
            )
            time.sleep(0.2)
        self.alive_before_load = proc.poll() is None
        # The version folder appears (in KServe the storage initializer puts it there before the container
        # starts; arriving late shows that the ports wait for the load).
        staging = self.work / "staging"
        shutil.copytree(kitchen / "1", staging)
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(staging, self.models / "1")
        self.server.wait_ready()

    def stop(self) -> None:
        self.server.stop()
        self._log.close()


@pytest.fixture(scope="module")
def pod():
    work = Path(tempfile.mkdtemp(prefix="pyserving-kserve-", dir="/tmp"))
    work.chmod(0o755)
    kitchen = export_kitchen(work / "export")
    try:
        started = Pod(work, kitchen)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    yield started
    started.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_ports_open_only_after_the_initial_load(pod):
    assert pod.alive_before_load
    assert pod.probes_before_load == [(False, False, None)] * 5
    assert _tcp_probe(pod.server.rest_port) and _tcp_probe(pod.server.grpc_port)
    ready = requests.get(pod.server.rest + "/readyz", timeout=5)
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "models": {NAME: "AVAILABLE"}})
    assert requests.get(pod.server.rest + "/healthz", timeout=5).status_code == 200
    assert requests.get(f"{pod.server.rest}/v2/health/ready", timeout=5).status_code == 200


def test_runs_as_uid_1000_with_no_capabilities(pod):
    status = _status(pod.server.proc.pid)
    assert "tensorflow_model_server" in Path(f"/proc/{pod.server.proc.pid}/cmdline").read_text()
    assert status["Uid"].split() == ["1000"] * 4
    assert status["Gid"].split() == ["1000"] * 4
    assert status["Groups"] == ""
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, capabilities
    assert status["NoNewPrivs"] == "1"


def test_serves_tf_serving_and_v2_over_rest_and_grpc(pod):
    server = pod.server
    r = post(f"{server.rest}/v1/models/{NAME}:predict", {"inputs": {"a": [1.0, 2.0], "b": [3.0, 4.0]}})
    assert (r.status_code, r.json()) == (200, {"outputs": {"product": [3.0, 8.0], "sum": [4.0, 6.0]}})
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    request.inputs["a"].CopyFrom(tf.make_tensor_proto(np.array([1.0, 2.0], np.float32)))
    request.inputs["b"].CopyFrom(tf.make_tensor_proto(np.array([3.0, 4.0], np.float32)))
    with grpc.insecure_channel(server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert list(response.outputs["sum"].float_val) == [4.0, 6.0]
    body = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]},
            {"name": "b", "datatype": "FP32", "shape": [2], "data": [3.0, 4.0]},
        ],
        "outputs": [{"name": "sum"}],
    }
    r = post(f"{server.rest}/v2/models/{NAME}/infer", body)
    assert r.status_code == 200
    assert r.json()["outputs"] == [{"name": "sum", "datatype": "FP32", "shape": [2], "data": [4.0, 6.0]}]
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        inputs = [v2_grpc_input(n, np.array(v, np.float32), "FP32") for n, v in (("a", [1, 2]), ("b", [3, 4]))]
        result = client.infer(NAME, inputs, outputs=[grpcclient.InferRequestedOutput("product")])
        assert result.as_numpy("product").tolist() == [3.0, 8.0]
    finally:
        client.close()


def test_needs_no_home_and_writes_only_kerass_config_to_tmp(pod):
    """The one file written: Keras (imported by TensorFlow's own __init__) saves its default keras.json in
    ~/.keras, or in /tmp/.keras when the home folder is not writable, and skips it when neither is. With a
    read-only root filesystem it lands in the /tmp emptyDir. pyserving itself writes nothing here."""
    tmp = Path(f"/proc/{pod.server.proc.pid}/root/tmp")  # the pod's /tmp, as the server's namespace has it
    kept = _kept_in_tmp(pod.work)
    written = sorted(
        p.relative_to(tmp).as_posix() for top in tmp.iterdir() if top.name not in kept for p in [top, *top.rglob("*")]
    )
    assert written == [".keras", ".keras/keras.json"]
    assert not Path(HOME).exists()


def _slow_call(server, protocol: str, n: int, channel: grpc.Channel) -> str:
    """One call of the kitchen's `slow` signature (counts to n): "ok" with the right answer, "refused"
    when no listener took it, else what went wrong."""
    if protocol == "rest":
        body = {"signature_name": "slow", "inputs": {"n": n}}
        try:
            r = requests.post(f"{server.rest}/v1/models/{NAME}:predict", json=body, timeout=60)
        except requests.ConnectionError as exc:
            return "refused" if "refused" in str(exc).lower() else f"error: {exc}"
        return "ok" if (r.status_code, r.json()) == (200, {"outputs": n}) else f"{r.status_code} {r.text}"
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    request.model_spec.signature_name = "slow"
    request.inputs["n"].CopyFrom(tf.make_tensor_proto(n, dtype=tf.int64))
    try:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    except grpc.RpcError as exc:
        return "refused" if exc.code() == grpc.StatusCode.UNAVAILABLE else f"{exc.code()}: {exc.details()}"
    return "ok" if list(response.outputs["count"].int64_val) == [n] else f"wrong: {response}"


class _BackToBack:
    """Slow calls sent back to back over REST and gRPC (a thread each) until one is refused, so that a call
    is in flight at every moment (at SIGTERM, at the close) whatever the machine's speed. Records
    (protocol, started, ended, outcome) with monotonic times."""

    def __init__(self, server, n: int) -> None:
        self.calls: list[tuple[str, float, float, str]] = []
        self._threads = [threading.Thread(target=self._send, args=(server, p, n)) for p in ("rest", "grpc")]
        for thread in self._threads:
            thread.start()

    def _send(self, server, protocol: str, n: int) -> None:
        with grpc.insecure_channel(server.grpc) as channel:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                started = time.monotonic()
                outcome = _slow_call(server, protocol, n, channel)
                self.calls.append((protocol, started, time.monotonic(), outcome))
                if outcome != "ok":
                    return

    def join(self) -> None:
        for thread in self._threads:
            thread.join(90)


def test_sigterm_drains_in_flight_requests_and_exits_within_the_pods_grace(pod):
    server = pod.server
    # n for about two seconds per call, measured as they run (side by side).
    started = time.monotonic()
    with grpc.insecure_channel(server.grpc) as channel:
        assert _slow_call(server, "rest", 200_000, channel) == "ok"
    n = max(int(200_000 * 2.0 / max(time.monotonic() - started, 0.01)), 200_000)
    traffic = _BackToBack(server, n)
    time.sleep(1.0)
    signalled, signalled_wall = time.monotonic(), time.time()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Not ready at once, while the ports still accept (the endpoints have seconds to drop the pod).
    assert _http_probe(server.rest + "/readyz") == 503
    assert _tcp_probe(server.grpc_port)
    # After --shutdown_delay_seconds (KServe's args leave the default, 5 s) the ports close.
    while "Closing the listeners" not in server.output():
        assert time.monotonic() - signalled < 10, server.output()
        time.sleep(0.02)
    closed = time.monotonic()
    time.sleep(0.3)
    assert not _tcp_probe(server.rest_port) and not _tcp_probe(server.grpc_port)
    with pytest.raises(requests.ConnectionError):
        post(f"{server.rest}/v1/models/{NAME}:predict", {"inputs": {"a": [1.0], "b": [1.0]}})
    assert server.proc.wait(POD_GRACE_S) == 0
    exited = time.monotonic()
    traffic.join()
    assert "closing the listeners in 5 s" in server.output()
    # When the server closed them, from its log line's time stamp (the polling above sees the line late
    # under load; a call that ended just after the close could seem to end before it).
    close_s = server.logged_at("Closing the listeners") - signalled_wall
    assert 4.9 < close_s < closed - signalled + 0.05
    for protocol in ("rest", "grpc"):
        calls = [(round(s - signalled, 3), round(e - signalled, 3), o) for p, s, e, o in traffic.calls if p == protocol]
        # In flight at SIGTERM and across the close, and each completed with its answer.
        assert any(s < 0 < e and o == "ok" for s, e, o in calls), calls
        assert any(s < close_s < e and o == "ok" for s, e, o in calls), (close_s, calls)
        # Every call but the last succeeded; the last, sent once the ports had closed, was refused. A gRPC
        # call that reaches grpcio's core in the last milliseconds before the close is CANCELLED by
        # grpcio's shutdown (docs/RELIABILITY.md): allowed only that close (the log is polled every 20 ms).
        assert [o for _, _, o in calls[:-1]] == ["ok"] * (len(calls) - 1), calls
        last_started, _, last = calls[-1]
        in_grpc_window = protocol == "grpc" and last == "StatusCode.CANCELLED: CANCELLED"
        assert last == "refused" or (in_grpc_window and close_s - last_started < 0.1), (close_s, calls)
    done = max(e for _, _, e, o in traffic.calls if o == "ok")
    print(
        f"\nSIGTERM -> listeners closed {closed - signalled:.2f} s, in-flight requests done "
        f"{done - signalled:.2f} s, exit 0 {exited - signalled:.2f} s"
    )
    assert exited - signalled < POD_GRACE_S - 5
    assert not Path(HOME).exists()

"""Side-by-side throughput and latency: pyserving (TF Serving API and Open Inference Protocol V2, REST and
gRPC, batching off and on), KServe, MLServer.

Every server runs the same SavedModel through TensorFlow on 127.0.0.1, one at a time, loaded by
wrk (REST, 1 thread) or h2load (gRPC, 1 thread) for a fixed time per point; each point is repeated
and the median reported. pyserving's rows that share a server process (TF API and V2, REST and gRPC)
run in one process and take turns within each repeat (A B, then B A), so a slow moment of the machine
falls on all of them. Also: the in-process floor (the signature called directly) and 1 MiB
tensors through REST JSON, gRPC tensor_content, V2 REST (JSON and the binary tensor data extension)
and V2 gRPC raw_input_contents/raw_output_contents. A "V2 targets" section divides V2 by the TF API
rows of the same run. The same CNN as an ONNX model (model.onnx, built
with the onnx helper API) runs through pyserving's ONNX runtime, beside ONNX Runtime called in-process
as its floor (pyserving only: the peers serve SavedModels). Writes bench/results/<time>.md and prints it.

Run `bench/run` (installs wrk, h2load and the peers first); `bench/run --quick` takes about a minute;
`bench/run --v2-only` runs only the V2 rows and the TF API REST rows they are compared with (tiny
model, 16 and 64 connections, 3 x 3 s per point, and the 1 MiB round trips), a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import requests
import tensorflow as tf
from _harness import free_port, running
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2 as v2_pb2
from tritonclient.grpc import service_pb2_grpc as v2_pb2_grpc

from pyserving.runtimes import registry
from pyserving.runtimes.tf_saved_model import SavedModelServable, session_config
from pyserving.tools.example import export_half_plus_two

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
BATCHING = (
    "max_batch_size { value: 64 } batch_timeout_micros { value: 0 } "
    "max_enqueued_batches { value: 64 } num_batch_threads { value: 2 }"
)


# -- models -------------------------------------------------------------------------------------------


def export_models(work: Path) -> dict[str, Path]:
    tiny = work / "tiny"
    export_half_plus_two(str(tiny))
    layers = tf.keras.layers  # the "simple MNIST convnet" of the Keras examples (untrained weights)
    cnn = tf.keras.Sequential(
        [
            tf.keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )
    cnn.export(str(work / "cnn" / "1"), verbose=False)
    big = work / "big"
    module = tf.Module()
    module.upload = tf.function(
        lambda x: {"sum": tf.reduce_sum(x)}, input_signature=[tf.TensorSpec([None], tf.float32)]
    )
    module.download = tf.function(lambda n: {"y": tf.fill([n], 0.5)}, input_signature=[tf.TensorSpec([], tf.int32)])
    module.roundtrip = tf.function(lambda x: {"y": tf.identity(x)}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(
        module,
        str(big / "1"),
        signatures={"upload": module.upload, "download": module.download, "roundtrip": module.roundtrip},
    )
    return {"tiny": tiny, "cnn": work / "cnn", "big": big, "onnx-cnn": work / "onnx-cnn"}


def export_onnx_cnn(base: Path) -> Path | None:
    """The CNN above as ONNX (NHWC input [N, 28, 28, 1] like the SavedModel's, random weights; dropout is
    a no-op when serving); None if the `onnx` package (pyserving's test extra) is missing."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)

    def weights(name: str, *shape: int) -> onnx.TensorProto:
        scale = np.sqrt(2.0 / np.prod(shape[1:])) if len(shape) > 1 else 0.0
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Transpose", ["inputs"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["output_0"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["batch", 28, 28, 1])],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            weights("w1", 32, 1, 3, 3),
            weights("b1", 32),
            weights("w2", 64, 32, 3, 3),
            weights("b2", 64),
            weights("w3", 1600, 10),
            weights("b3", 10),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (base / "1").mkdir(parents=True)
    onnx.save(model, str(base / "1" / "model.onnx"))
    return base


def one_row(base: Path) -> tuple[str, np.ndarray]:
    """The serving_default input alias and one batch-1 example for it."""
    folder = str(next(base.iterdir()))
    platform = registry.detect(folder) or registry.TENSORFLOW_PLATFORM
    signature = registry.signature_defs(platform, folder, registry.RuntimeOptions())["serving_default"]
    alias, info = next(iter(signature.inputs.items()))
    shape = [1] + [max(d.size, 1) for d in info.tensor_shape.dim[1:]]
    return alias, np.full(shape, 0.5, np.float32)


# -- servers ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(kind: str, model: Path, work: Path, extra_flags: tuple[str, ...] = ()):
    """Start one server for `model`; yield (rest_url_base, grpc_port or None)."""
    rest, grpc_port = free_port(), free_port()
    if kind.startswith("pyserving"):
        flags = [
            "--host=127.0.0.1",
            f"--port={grpc_port}",
            f"--rest_api_port={rest}",
            "--model_name=m",
            f"--model_base_path={model}",
        ]
        if kind.endswith("batching"):
            (work / "batching.config").write_text(BATCHING)
            flags += ["--enable_batching", f"--batching_parameters_file={work / 'batching.config'}"]
        command = [sys.executable, "-m", "pyserving", *flags, *extra_flags]
    elif kind == "kserve":
        command = [
            str(VENVS / "kserve" / "bin" / "python"),
            str(HERE / "peers" / "kserve_server.py"),
            "m",
            str(next(model.iterdir())),
            str(rest),
        ]
        grpc_port = None
    else:
        folder = work / "mlserver"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copy(HERE / "peers" / "mlserver_runtime.py", folder)
        (folder / "settings.json").write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": rest,
                    "grpc_port": free_port(),
                    "metrics_port": free_port(),
                    "parallel_workers": 0,
                    "debug": False,
                }
            )
        )
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": "m",
                    "implementation": "mlserver_runtime.SavedModelRuntime",
                    "parameters": {"uri": str(next(model.iterdir()))},
                }
            )
        )
        command = [str(VENVS / "mlserver" / "bin" / "mlserver"), "start", str(folder)]
        grpc_port = None
    with running(command, rest, work / f"{kind}.log", work):
        yield f"http://127.0.0.1:{rest}", grpc_port


SERVERS = [
    "pyserving REST",
    "pyserving REST batching",
    "pyserving gRPC",
    "pyserving gRPC batching",
    "pyserving V2 REST",
    "pyserving V2 REST batching",
    "pyserving V2 gRPC",
    "pyserving V2 gRPC batching",
    "kserve",
    "mlserver",
]
# --v2-only: the V2 rows and the TF API REST rows the targets divide them by.
V2_ONLY_SERVERS = [
    "pyserving REST",
    "pyserving REST batching",
    "pyserving V2 REST",
    "pyserving V2 REST batching",
    "pyserving V2 gRPC",
    "pyserving V2 gRPC batching",
]
TF_PREDICT = "/tensorflow.serving.PredictionService/Predict"
V2_INFER = "/inference.GRPCInferenceService/ModelInfer"


def process_kind(server: str) -> str:
    """Which server process a row runs against: rows of one kind share a process."""
    if server in ("kserve", "mlserver"):
        return server
    return "pyserving batching" if server.endswith("batching") else "pyserving"


def v2_json_body(alias: str, row: np.ndarray) -> bytes:
    """A V2 (Open Inference Protocol) JSON infer body: one FP32 input, flat data, every output as JSON."""
    body = {"inputs": [{"name": alias, "shape": list(row.shape), "datatype": "FP32", "data": row.ravel().tolist()}]}
    return json.dumps(body).encode()


def request_for(server: str, alias: str, row: np.ndarray) -> tuple[str, bytes]:
    """(path, JSON body) of a batch-1 predict in the row's protocol."""
    if server == "mlserver" or " V2 " in server:
        return "/v2/models/m/infer", v2_json_body(alias, row)
    return "/v1/models/m:predict", json.dumps({"instances": row.tolist()}).encode()


def _framed(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def grpc_body(alias: str, row: np.ndarray) -> bytes:
    """A length-prefixed TF Serving PredictRequest for h2load."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs[alias].CopyFrom(tf.make_tensor_proto(row))
    return _framed(request.SerializeToString())


def v2_grpc_request(alias: str, row: np.ndarray):
    """A V2 ModelInferRequest: one FP32 input in raw_input_contents, every output."""
    request = v2_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name=alias, datatype="FP32", shape=list(row.shape))
    request.raw_input_contents.append(row.astype("<f4").tobytes())
    return request


def grpc_call_for(server: str, alias: str, row: np.ndarray) -> tuple[str, bytes]:
    """(gRPC method path, length-prefixed request) of a batch-1 predict in the row's protocol, for h2load."""
    if " V2 " in server:
        return V2_INFER, _framed(v2_grpc_request(alias, row).SerializeToString())
    return TF_PREDICT, grpc_body(alias, row)


# -- load generators ----------------------------------------------------------------------------------


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise RuntimeError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, body: bytes, connections: int, seconds: float, work: Path, timeout: float | None = None) -> dict:
    """One wrk run; `timeout`: wrk's per-request timeout in seconds (default wrk's 2 s: a slower answer counts
    as a timeout error and is left out of the latencies)."""
    (work / "body.json").write_bytes(body)
    script = work / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{work / "body.json"}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
        + ([f"--timeout={timeout:g}s"] if timeout else [])
        + [url],
        capture_output=True,
        text=True,
        timeout=seconds + (timeout or 0) + 60,
    ).stdout
    # Failed requests: non-2xx answers plus socket errors (connect, read, write, timeout).
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    # wrk pads the unit to two characters: a latency of a second or more ends in "s " (a trailing space).
    p50 = re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M)
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)  # avg, stdev, max
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50": _ms(p50.group(1)) if p50 else math.nan,
        "p99": _ms(p99.group(1)) if p99 else math.nan,
        "max": _ms(latency.group(1)) if latency else math.nan,
        "errors": errors,
    }


def h2load(port: int, body: bytes, connections: int, seconds: float, work: Path, path: str = TF_PREDICT) -> dict:
    (work / "grpc.bin").write_bytes(body)
    log = work / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends to an existing log file
    out = subprocess.run(
        [
            "h2load",
            "-t1",
            f"-c{connections}",
            "-m1",
            f"-D{seconds:g}",
            "-d",
            str(work / "grpc.bin"),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log}",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    durations = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip())
    status = re.search(r"status codes: (\d+) 2xx", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not durations:  # nothing completed (a stalled server): report it instead of stopping the run
        durations = [math.nan]
    return {
        "rps": float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1)),
        "p50": durations[len(durations) // 2],
        "p99": durations[int(len(durations) * 0.99)],
        "max": durations[-1],
        "errors": int(done.group(1)) - int(done.group(2)) if done else (0 if status else -1),
    }


def _check_grpc(port: int, alias: str, row: np.ndarray) -> None:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = predict_pb2.PredictRequest.FromString(grpc_body(alias, row)[5:])
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)


def _check_v2_grpc(port: int, alias: str, row: np.ndarray) -> None:
    """One ModelInfer through a real stub: it succeeds and answers raw_output_contents of FP32 values."""
    import grpc

    _, body = grpc_call_for("pyserving V2 gRPC", alias, row)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            v2_pb2.ModelInferRequest.FromString(body[5:]), timeout=60
        )
    if not response.outputs or len(response.raw_output_contents) != len(response.outputs):
        raise RuntimeError(f"V2 gRPC: expected raw_output_contents for every output, got {response}")


def _check_rest(server: str, url: str, alias: str, row: np.ndarray) -> None:
    """One request of the row's protocol succeeds (wrk counts statuses only); a V2 answer has its outputs."""
    path, body = request_for(server, alias, row)
    response = requests.post(url + path, data=body, timeout=60)
    response.raise_for_status()
    if " V2 " in server and not response.json().get("outputs"):
        raise RuntimeError(f"V2 REST: no outputs in {response.text[:200]!r}")


def median_point(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


# -- the in-process floor and big tensors -------------------------------------------------------------


def floor(model: Path, seconds: float, repeats: int) -> dict:
    """The signature called directly, one thread, batch 1: the best any server could do per call. A SavedModel
    runs in a TF Session; an ONNX model in an ONNX Runtime session with its default options, called directly.

    The first call is left out: TensorFlow optimises the graph then (seconds for the CNN on a busy machine).
    """
    folder = str(next(model.iterdir()))
    alias, row = one_row(model)
    if registry.detect(folder) == registry.ONNX_PLATFORM:
        import onnxruntime

        session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])

        def call() -> object:
            return session.run(None, {alias: row})

        close = None
    else:
        servable = SavedModelServable(folder, ["serve"], session_config(0, 0))
        outputs = sorted(servable.signature_defs["serving_default"].outputs)

        def call() -> object:
            return servable.run("serving_default", {alias: row}, outputs, 0)

        close = servable.close
    call()
    runs = []
    for _ in range(repeats):
        samples, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e3)
        samples.sort()
        runs.append(
            {
                "rps": len(samples) / seconds,
                "p50": samples[len(samples) // 2],
                "p99": samples[int(len(samples) * 0.99)],
                "errors": 0,
            }
        )
    if close is not None:
        close()
    return median_point(runs)


def _v2_binary_body(header: dict, tensors: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A V2 REST body with the binary tensor data extension: the JSON header, then each tensor's raw bytes."""
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def _v2_binary_outputs(response: requests.Response) -> dict[str, bytes]:
    """The binary outputs of a V2 REST response (only to check an answer once, never timed)."""
    size = response.headers.get("Inference-Header-Content-Length")
    if size is None:
        raise RuntimeError(f"V2 REST: no Inference-Header-Content-Length in {dict(response.headers)}")
    header, rest, outputs = json.loads(response.content[: int(size)]), response.content[int(size) :], {}
    for output in header["outputs"]:
        length = output.get("parameters", {}).get("binary_data_size")
        if length is not None:
            outputs[output["name"]], rest = rest[:length], rest[length:]
    return outputs


def big_tensors(model: Path, work: Path, repeats: int, v2_only: bool = False) -> list[tuple[str, float, float]]:
    """MB/s for 1 MiB of float32 sent (upload), received (download) and both (round trip: 1 MiB per request
    latency), REST JSON and gRPC tensor_content (both ways: responses too, with
    --enable_serialization_as_tensor_content), gRPC float_val responses (TF Serving's default), and V2:
    REST with the binary tensor data extension (both ways), REST JSON, gRPC raw_input_contents /
    raw_output_contents. Random values, so JSON carries 9-digit numbers. The REST client sends bytes and
    reads bytes, parsing nothing (that would time the client's decoder); every V2 row's answer is checked
    once before timing. The rows of one server take turns, `repeats` times, and each row's median is kept.
    v2_only: only the V2 rows and the TF API REST JSON rows they are compared with.
    Each row: (direction, tensor MiB/s, bytes on the wire per second: request and response bodies)."""
    n = 262144
    import grpc

    x = np.random.default_rng(0).random(n, dtype=np.float32)
    raw = x.astype("<f4").tobytes()
    upload = json.dumps({"signature_name": "upload", "inputs": {"x": x.tolist()}})
    download = json.dumps({"signature_name": "download", "inputs": {"n": n}})
    roundtrip = json.dumps({"signature_name": "roundtrip", "inputs": {"x": x.tolist()}})
    up, down, both = predict_pb2.PredictRequest(), predict_pb2.PredictRequest(), predict_pb2.PredictRequest()
    for request, signature in ((up, "upload"), (down, "download"), (both, "roundtrip")):
        request.model_spec.name, request.model_spec.signature_name = "m", signature
    up.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    both.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    down.inputs["n"].CopyFrom(tf.make_tensor_proto(n, dtype=tf.int32))

    # V2 REST: the signature is a request parameter; x goes as raw bytes (binary) or a flat JSON list.
    def v2_header(signature: str, binary_in: bool, binary_out: str | None) -> dict:
        header: dict = {"parameters": {"signature_name": signature}}
        if signature == "download":
            header["inputs"] = [{"name": "n", "shape": [], "datatype": "INT32", "data": [n]}]
        elif binary_in:
            header["inputs"] = [
                {"name": "x", "shape": [n], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ]
        else:
            header["inputs"] = [{"name": "x", "shape": [n], "datatype": "FP32", "data": x.tolist()}]
        if binary_out:
            header["outputs"] = [{"name": binary_out, "parameters": {"binary_data": True}}]
        return header

    v2_rest = {
        "upload binary": _v2_binary_body(v2_header("upload", True, None), [raw]),
        "download binary": _v2_binary_body(v2_header("download", False, "y"), []),
        "round trip binary": _v2_binary_body(v2_header("roundtrip", True, "y"), [raw]),
        "upload JSON": (json.dumps(v2_header("upload", False, None)).encode(), {}),
        "download JSON": (json.dumps(v2_header("download", False, None)).encode(), {}),
        "round trip JSON": (json.dumps(v2_header("roundtrip", False, None)).encode(), {}),
    }
    v2_grpc = {}  # V2 gRPC: the same signatures, tensors as raw little-endian bytes
    for key, signature in (("upload", "upload"), ("download", "download"), ("round trip", "roundtrip")):
        request = v2_pb2.ModelInferRequest(model_name="m")
        request.parameters["signature_name"].string_param = signature
        if signature == "download":
            request.inputs.add(name="n", datatype="INT32", shape=[])
            request.raw_input_contents.append(np.int32(n).astype("<i4").tobytes())
        else:
            request.inputs.add(name="x", datatype="FP32", shape=[n])
            request.raw_input_contents.append(raw)
        v2_grpc[key] = request

    def check_v2(key: str, response: requests.Response | None, grpc_response=None) -> None:
        """The answer carries the tensor it should: y == x (round trip), 262144 halves, or sum(x)."""
        if grpc_response is not None:
            got = np.frombuffer(grpc_response.raw_output_contents[0], "<f4")
        elif "binary" in key and not key.startswith("upload"):
            got = np.frombuffer(_v2_binary_outputs(response)["y"], "<f4")
        else:
            got = np.asarray(response.json()["outputs"][0]["data"], np.float32)
        expected = {"upload": np.float32(x.sum()), "download": np.full(n, 0.5, np.float32), "round trip": x}
        want = next(value for prefix, value in expected.items() if key.startswith(prefix))
        if got.size != np.size(want) or not np.allclose(got.ravel(), np.ravel(want), rtol=1e-4):
            raise RuntimeError(f"V2 {key}: wrong answer ({got.size} values, first {got.ravel()[:3]})")

    results = []
    phases = [("--enable_serialization_as_tensor_content=true",)] + ([] if v2_only else [()])
    for flags in phases:
        with serve("pyserving", model, work, flags) as (url, grpc_port):
            session = requests.Session()
            channel = grpc.insecure_channel(
                f"127.0.0.1:{grpc_port}",
                options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
            )
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

            def rest(body: str | bytes, path: str = "/v1/models/m:predict", headers=None, session=session, url=url):
                def post_body() -> int:
                    response = session.post(url + path, data=body, headers=headers)
                    response.raise_for_status()
                    return len(body) + len(response.content)

                return post_body

            def grpc_call(request: predict_pb2.PredictRequest, stub=stub):
                return lambda: request.ByteSize() + stub.Predict(request, timeout=60).ByteSize()

            if flags:
                calls = {
                    "REST JSON upload (1 MiB in)": rest(upload),
                    "REST JSON download (1 MiB out)": rest(download),
                    "REST JSON round trip (1 MiB in and out)": rest(roundtrip),
                }
                if not v2_only:
                    calls |= {
                        "gRPC tensor_content upload": grpc_call(up),
                        "gRPC tensor_content download": grpc_call(down),
                        "gRPC tensor_content round trip": grpc_call(both),
                    }
                v2_stub = v2_pb2_grpc.GRPCInferenceServiceStub(channel)
                for key, (body, headers) in v2_rest.items():
                    response = session.post(url + "/v2/models/m/infer", data=body, headers=headers, timeout=60)
                    if response.status_code != 200:
                        raise RuntimeError(f"V2 REST {key}: {response.status_code} {response.text[:300]!r}")
                    check_v2(key, response)
                for key, request in v2_grpc.items():
                    check_v2(key, None, v2_stub.ModelInfer(request, timeout=60))
                label = {"upload": "upload (1 MiB in)", "download": "download (1 MiB out)"}
                label["round trip"] = "round trip (1 MiB in and out)"
                for key, (body, headers) in v2_rest.items():
                    what, encoding = key.rsplit(" ", 1)
                    calls[f"V2 REST {encoding} {label[what]}"] = rest(body, "/v2/models/m/infer", headers)
                for key, request in v2_grpc.items():
                    calls[f"V2 gRPC raw {key}"] = lambda request=request, v2_stub=v2_stub: (
                        request.ByteSize() + v2_stub.ModelInfer(request, timeout=60).ByteSize()
                    )
            else:
                calls = {"gRPC float_val download (the default response encoding)": grpc_call(down)}
            wire = {name: call() for name, call in calls.items()}  # one warm-up call each
            times: dict[str, list[float]] = {name: [] for name in calls}
            for repeat in range(repeats):  # the rows take turns, so a busy moment does not fall on one row
                for name, call in calls.items() if repeat % 2 == 0 else reversed(calls.items()):
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
            for name in calls:
                seconds = statistics.median(times[name])
                results.append((name, n * 4 / 2**20 / seconds, wire[name] / 1e6 / seconds))
            channel.close()
    return results


# -- the run ------------------------------------------------------------------------------------------


def load_point(
    server: str, url: str, grpc_port: int | None, alias: str, row: np.ndarray, conns: int, seconds: float, work: Path
) -> dict:
    """One wrk or h2load run of the row's batch-1 request."""
    if "gRPC" in server:
        path, body = grpc_call_for(server, alias, row)
        return h2load(grpc_port, body, conns, seconds, work, path)
    path, body = request_for(server, alias, row)
    return wrk(url + path, body, conns, seconds, work)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 and 64 connections, short points")
    parser.add_argument(
        "--v2-only",
        action="store_true",
        help="only the V2 rows and the TF API REST rows they are compared with: tiny model, 16 and 64 "
        "connections, 3 x 3 s per point taking turns, and the 1 MiB round trips (V2 and TF REST JSON)",
    )
    parser.add_argument("--models", help="comma-separated subset of tiny,cnn,onnx-cnn")
    parser.add_argument("--servers", help="comma-separated subset of the server names")
    parser.add_argument("--connections", help="comma-separated connection counts")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--repeats", type=int)
    parser.add_argument(
        "--big",
        action=argparse.BooleanOptionalAction,
        help="the 1 MiB tensor table (default: on in a full run and with --v2-only, off with --quick or --models)",
    )
    args = parser.parse_args()
    seconds, repeats = (3, 1) if args.quick else (3, 3) if args.v2_only else (10, 3)
    seconds = args.seconds or seconds
    repeats = args.repeats or repeats
    connections = (16, 64) if args.quick or args.v2_only else (1, 16, 64)
    if args.connections:
        connections = tuple(int(c) for c in args.connections.split(","))
    work = Path(tempfile.mkdtemp(prefix="pyserving-bench-"))
    models = export_models(work)
    servers = V2_ONLY_SERVERS if args.v2_only else SERVERS
    table: dict[tuple[str, str, int], dict] = {}
    if args.servers:
        servers = [s for s in servers if s in args.servers.split(",")]
    chosen = ["tiny"] if args.quick or args.v2_only else ["tiny", "cnn", "onnx-cnn"]
    if args.models:
        chosen = args.models.split(",")
    for model_name in chosen:
        model = models[model_name]
        if model_name == "onnx-cnn" and export_onnx_cnn(model) is None:
            print("skipping onnx-cnn: the onnx package is missing (bin/install --test)", file=sys.stderr)
            continue
        alias, row = one_row(model)
        if not args.v2_only:
            table[(model_name, "in-process floor (1 thread)", 1)] = floor(model, seconds, repeats)
        groups: dict[str, list[str]] = {}  # rows that share a server process take turns in it
        for server in servers:
            groups.setdefault(process_kind(server), []).append(server)
        for kind, rows in groups.items():
            if kind in ("kserve", "mlserver") and model_name == "onnx-cnn":
                continue  # the peers serve SavedModels through TensorFlow
            if kind in ("kserve", "mlserver") and not (VENVS / kind).exists():
                print(f"skipping {kind}: run bench/setup", file=sys.stderr)
                continue
            with serve(kind, model, work) as (url, grpc_port):
                for server in rows:  # wrk and h2load count HTTP statuses only: check each call once
                    if "gRPC" not in server:
                        _check_rest(server, url, alias, row)
                    elif " V2 " in server:
                        _check_v2_grpc(grpc_port, alias, row)
                    else:
                        _check_grpc(grpc_port, alias, row)
                for conns in connections:
                    runs: dict[str, list[dict]] = {server: [] for server in rows}
                    for repeat in range(repeats):
                        for server in rows if repeat % 2 == 0 else rows[::-1]:
                            runs[server].append(load_point(server, url, grpc_port, alias, row, conns, seconds, work))
                    for server in rows:
                        point = median_point(runs[server])
                        point["runs"] = [run["rps"] for run in runs[server]]
                        table[(model_name, server, conns)] = point
                        print(model_name, server, conns, point, flush=True)
    want_big = args.big if args.big is not None else args.v2_only or not (args.quick or args.models)
    big = big_tensors(models["big"], work, 20, v2_only=args.v2_only) if want_big else []
    report = render(table, big, seconds, repeats, args.v2_only)
    suffix = "-v2" if args.v2_only else "-quick" if args.quick else ""
    out = HERE / "results" / f"{datetime.datetime.now():%Y-%m-%d-%H%M}{suffix}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"written to {out}")
    shutil.rmtree(work, ignore_errors=True)


def _order(key: tuple[str, str, int]) -> tuple:
    _, server, conns = key
    return (SERVERS.index(server) if server in SERVERS else -1, conns)


def v2_targets(table, big) -> list[str]:
    """The issue's targets as ratios of this run's rows: V2 over the TF API rows it replaces."""
    lines = ["## V2 targets", ""]
    rates = {name: rate for name, rate, _ in big}
    v2_binary = rates.get("V2 REST binary round trip (1 MiB in and out)")
    tf_json = rates.get("REST JSON round trip (1 MiB in and out)")
    if v2_binary and tf_json:
        ratio = v2_binary / tf_json
        lines += [
            f"- (a) 1 MiB round trip, V2 REST binary / TF API REST JSON: {v2_binary:.0f} / {tf_json:.0f} MB/s = "
            f"**{ratio:.1f}x** (target >= 10x: {'met' if ratio >= 10 else 'NOT met'})",
        ]
        for other in ("V2 REST JSON round trip (1 MiB in and out)", "V2 gRPC raw round trip"):
            if rates.get(other):
                lines.append(f"  - {other} / TF API REST JSON: {rates[other] / tf_json:.1f}x")
        if rates.get("gRPC tensor_content round trip"):
            lines.append(
                f"  - V2 REST binary / TF API gRPC tensor_content round trip: "
                f"{v2_binary / rates['gRPC tensor_content round trip']:.2f}x"
            )
    else:
        lines.append("- (a) 1 MiB round trip: not measured in this run (--big)")
    lines += [
        "- (b) tiny model, V2 REST req/s / TF API REST req/s (target >= 0.85). The two rows ran in one server "
        "process, taking turns within each repeat, so each repeat gives a paired ratio: 'ratio' is their "
        "median (what the target is judged on); 'of medians' divides the two median req/s, which can pair "
        "a quiet moment of the machine with a busy one.",
        "",
        "| batching | connections | V2 REST req/s | TF API REST req/s | ratio | per repeat | of medians | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    found = False
    for suffix, label in (("", "off"), (" batching", "on")):
        for (model, server, conns), point in sorted(table.items(), key=lambda item: item[0][2]):
            if model != "tiny" or server != f"pyserving V2 REST{suffix}":
                continue
            tf_point = table.get((model, f"pyserving REST{suffix}", conns))
            if not tf_point or not tf_point["rps"]:
                continue
            found = True
            pairs = [a / b for a, b in zip(point["runs"], tf_point["runs"], strict=True) if b]
            ratio = statistics.median(pairs)
            lines.append(
                f"| {label} | {conns} | {point['rps']:.0f} | {tf_point['rps']:.0f} | **{ratio:.2f}** | "
                f"{', '.join(f'{r:.2f}' for r in pairs)} | {point['rps'] / tf_point['rps']:.2f} | "
                f"{'met' if ratio >= 0.85 else 'NOT met'} |"
            )
    if not found:
        lines.append("| - | - | not measured in this run | | | | |")
    lines.append("")
    grpc_lines = []
    for (model, server, conns), point in sorted(table.items(), key=lambda item: _order(item[0])):
        if model == "tiny" and server.startswith("pyserving V2 gRPC"):
            tf_point = table.get((model, server.replace(" V2", ""), conns))
            if tf_point and tf_point["rps"]:
                pairs = [a / b for a, b in zip(point["runs"], tf_point["runs"], strict=True) if b]
                grpc_lines.append(f"| {server} | {conns} | {statistics.median(pairs):.2f} |")
    if grpc_lines:
        lines += [
            "V2 gRPC / TF API gRPC req/s, median of the paired ratios (no target):",
            "",
            "| row | connections | ratio |",
            "|---|---|---|",
        ]
        lines += grpc_lines + [""]
    return lines


def render(table, big, seconds, repeats, v2_only=False) -> str:
    lines = [
        f"# pyserving vs KServe vs MLServer ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"{os.cpu_count()} CPUs, 127.0.0.1, wrk/h2load with 1 thread, {seconds} s per point, median of "
        f"{repeats}; batch-1 requests. Ratios are against KServe at the same point. pyserving rows of one "
        "server process (batching off, or on) take turns within each repeat.",
        "",
    ]
    if v2_only:
        lines[2] += " --v2-only: the V2 rows and the TF API REST rows they are compared with."
    for model in sorted({key[0] for key in table}, key=lambda m: (m != "tiny", m)):
        lines += [
            f"## {model}",
            "",
            "| server | connections | req/s | p50 ms | p99 ms | errors | x KServe req/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for (name, server, conns), point in sorted(table.items(), key=lambda item: _order(item[0])):
            if name != model:
                continue
            kserve = table.get((model, "kserve", conns))
            ratio = f"{point['rps'] / kserve['rps']:.2f}" if kserve and server != "kserve" else ""
            lines.append(
                f"| {server} | {conns} | {point['rps']:.0f} | {point['p50']:.2f} | {point['p99']:.2f} | "
                f"{point['errors']:.0f} | {ratio} |"
            )
        lines.append("")
    if big:
        lines += [
            "## 1 MiB float32 tensor (pyserving)",
            "",
            "MB/s of tensor: 1 MiB per request latency. On the wire: request and response bodies (JSON text, "
            "protobuf, or V2's JSON header and raw bytes) per second. V2 binary: the binary tensor data "
            "extension (raw little-endian bytes after the JSON header, both ways where the row moves 1 MiB "
            "out).",
            "",
            "| direction | MB/s of tensor | MB/s on the wire |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {rate:.0f} | {wire:.0f} |" for name, rate, wire in big]
        lines.append("")
    if any(" V2 " in key[1] for key in table) or any(name.startswith("V2 ") for name, _, _ in big):
        lines += v2_targets(table, big)
    return "\n".join(lines)


if __name__ == "__main__":
    main()

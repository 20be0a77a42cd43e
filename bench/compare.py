"""Side-by-side throughput and latency: pyserving (REST and gRPC, batching off and on), KServe, MLServer.

Every server runs the same SavedModel through TensorFlow on 127.0.0.1, one at a time, loaded by
wrk (REST, 1 thread) or h2load (gRPC, 1 thread) for a fixed time per point; each point is repeated
and the median reported. Also: the in-process floor (the signature called directly) and 1 MiB
tensors through REST JSON and gRPC tensor_content. The same CNN as an ONNX model (model.onnx, built
with the onnx helper API) runs through pyserving's ONNX runtime, beside ONNX Runtime called in-process
as its floor (pyserving only: the peers serve SavedModels). Writes bench/results/<time>.md and prints it.

Run `bench/run` (installs wrk, h2load and the peers first); `bench/run --quick` takes about a minute.
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
from _harness import free_port, wait_for_port
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

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
    log = open(work / f"{kind}.log", "w")
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
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        wait_for_port(rest, proc, timeout=180)
        yield f"http://127.0.0.1:{rest}", grpc_port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def request_for(kind: str, alias: str, row: np.ndarray) -> tuple[str, bytes]:
    """(path, JSON body) of a batch-1 predict in the server's own protocol."""
    if kind == "mlserver":
        body = {"inputs": [{"name": alias, "shape": list(row.shape), "datatype": "FP32", "data": row.ravel().tolist()}]}
        return "/v2/models/m/infer", json.dumps(body).encode()
    return "/v1/models/m:predict", json.dumps({"instances": row.tolist()}).encode()


def grpc_body(alias: str, row: np.ndarray) -> bytes:
    """A length-prefixed gRPC message for h2load."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs[alias].CopyFrom(tf.make_tensor_proto(row))
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


# -- load generators ----------------------------------------------------------------------------------


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise RuntimeError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, body: bytes, connections: int, seconds: float, work: Path) -> dict:
    (work / "body.json").write_bytes(body)
    script = work / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{work / "body.json"}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    # Failed requests: non-2xx answers plus socket errors (connect, read, write, timeout).
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)$", out, re.M)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50": _ms(p50.group(1)) if p50 else math.nan,
        "p99": _ms(p99.group(1)) if p99 else math.nan,
        "errors": errors,
    }


def h2load(port: int, body: bytes, connections: int, seconds: float, work: Path) -> dict:
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
            f"http://127.0.0.1:{port}/tensorflow.serving.PredictionService/Predict",
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
        "errors": int(done.group(1)) - int(done.group(2)) if done else (0 if status else -1),
    }


def _check_grpc(port: int, alias: str, row: np.ndarray) -> None:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = predict_pb2.PredictRequest.FromString(grpc_body(alias, row)[5:])
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)


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


def big_tensors(model: Path, work: Path, repeats: int) -> list[tuple[str, float, float]]:
    """MB/s for 1 MiB of float32 sent (upload), received (download) and both (round trip: 1 MiB per request
    latency), REST JSON and gRPC tensor_content (both ways: responses too, with
    --enable_serialization_as_tensor_content), and gRPC float_val responses (TF Serving's default);
    random values, so JSON carries 9-digit numbers.
    Each row: (direction, tensor MiB/s, bytes on the wire per second: request and response bodies)."""
    n = 262144
    import grpc

    x = np.random.default_rng(0).random(n, dtype=np.float32)
    upload = json.dumps({"signature_name": "upload", "inputs": {"x": x.tolist()}})
    download = json.dumps({"signature_name": "download", "inputs": {"n": n}})
    roundtrip = json.dumps({"signature_name": "roundtrip", "inputs": {"x": x.tolist()}})
    up, down, both = predict_pb2.PredictRequest(), predict_pb2.PredictRequest(), predict_pb2.PredictRequest()
    for request, signature in ((up, "upload"), (down, "download"), (both, "roundtrip")):
        request.model_spec.name, request.model_spec.signature_name = "m", signature
    up.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    both.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    down.inputs["n"].CopyFrom(tf.make_tensor_proto(n, dtype=tf.int32))
    results = []
    for flags in (("--enable_serialization_as_tensor_content=true",), ()):
        with serve("pyserving", model, work, flags) as (url, grpc_port):
            session = requests.Session()
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", -1)])
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

            def rest(body: str, session=session, url=url):  # bytes only: parsing would time the client's decoder
                def post_body() -> int:
                    response = session.post(url + "/v1/models/m:predict", data=body)
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
                    "gRPC tensor_content upload": grpc_call(up),
                    "gRPC tensor_content download": grpc_call(down),
                    "gRPC tensor_content round trip": grpc_call(both),
                }
            else:
                calls = {"gRPC float_val download (the default response encoding)": grpc_call(down)}
            for name, call in calls.items():
                wire = call()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                results.append((name, n * 4 / 2**20 / seconds, wire / 1e6 / seconds))
            channel.close()
    return results


# -- the run ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 and 64 connections, short points")
    parser.add_argument("--models", help="comma-separated subset of tiny,cnn,onnx-cnn")
    parser.add_argument("--servers", help="comma-separated subset of the server names")
    parser.add_argument("--connections", help="comma-separated connection counts")
    parser.add_argument("--seconds", type=float)
    args = parser.parse_args()
    seconds, repeats = (3, 1) if args.quick else (10, 3)
    seconds = args.seconds or seconds
    connections = (16, 64) if args.quick else (1, 16, 64)
    if args.connections:
        connections = tuple(int(c) for c in args.connections.split(","))
    work = Path(tempfile.mkdtemp(prefix="pyserving-bench-"))
    models = export_models(work)
    servers = [
        "pyserving REST",
        "pyserving REST batching",
        "pyserving gRPC",
        "pyserving gRPC batching",
        "kserve",
        "mlserver",
    ]
    table: dict[tuple[str, str, int], dict] = {}
    if args.servers:
        servers = [s for s in servers if s in args.servers.split(",")]
    chosen = args.models.split(",") if args.models else (["tiny"] if args.quick else ["tiny", "cnn", "onnx-cnn"])
    for model_name in chosen:
        model = models[model_name]
        if model_name == "onnx-cnn" and export_onnx_cnn(model) is None:
            print("skipping onnx-cnn: the onnx package is missing (bin/install --test)", file=sys.stderr)
            continue
        alias, row = one_row(model)
        table[(model_name, "in-process floor (1 thread)", 1)] = floor(model, seconds, repeats)
        for server in servers:
            kind = {"kserve": "kserve", "mlserver": "mlserver"}.get(server, "pyserving")
            if "batching" in server:
                kind = "pyserving batching"
            if kind in ("kserve", "mlserver") and model_name == "onnx-cnn":
                continue  # the peers serve SavedModels through TensorFlow
            if kind in ("kserve", "mlserver") and not (VENVS / kind).exists():
                print(f"skipping {server}: run bench/setup", file=sys.stderr)
                continue
            with serve(kind, model, work) as (url, grpc_port):
                path, body = request_for(kind if kind in ("kserve", "mlserver") else "pyserving", alias, row)
                requests.post(url + path, data=body, timeout=60).raise_for_status()
                if grpc_port is not None:  # h2load counts HTTP statuses only: check the gRPC call itself once
                    _check_grpc(grpc_port, alias, row)
                for conns in connections:
                    if "gRPC" in server:
                        runs = [h2load(grpc_port, grpc_body(alias, row), conns, seconds, work) for _ in range(repeats)]
                    else:
                        runs = [wrk(url + path, body, conns, seconds, work) for _ in range(repeats)]
                    table[(model_name, server, conns)] = median_point(runs)
                    print(model_name, server, conns, table[(model_name, server, conns)], flush=True)
    big = [] if args.quick or args.models else big_tensors(models["big"], work, 20)
    report = render(table, big, seconds, repeats)
    out = HERE / "results" / f"{datetime.datetime.now():%Y-%m-%d-%H%M}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"written to {out}")
    shutil.rmtree(work, ignore_errors=True)


def render(table, big, seconds, repeats) -> str:
    lines = [
        f"# pyserving vs KServe vs MLServer ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"{os.cpu_count()} CPUs, 127.0.0.1, wrk/h2load with 1 thread, {seconds} s per point, median of "
        f"{repeats}; batch-1 requests. Ratios are against KServe at the same point.",
        "",
    ]
    for model in sorted({key[0] for key in table}, key=lambda m: (m != "tiny", m)):
        lines += [
            f"## {model}",
            "",
            "| server | connections | req/s | p50 ms | p99 ms | errors | x KServe req/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for (name, server, conns), point in table.items():
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
            "MB/s of tensor: 1 MiB per request latency. On the wire: request and response bodies (JSON text "
            "or protobuf) per second.",
            "",
            "| direction | MB/s of tensor | MB/s on the wire |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {rate:.0f} | {wire:.0f} |" for name, rate, wire in big]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

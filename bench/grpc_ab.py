"""A/B of two pyserving source trees on the tiny model: gRPC Predict, V2 gRPC ModelInfer and REST :predict.

    python bench/grpc_ab.py A_SRC B_SRC [--rounds 3] [--seconds 3]

With --download, also a 1 MiB float32 answer (gRPC Predict, float_val, the default encoding): the
median time of a call through the official stub, each tree in turn.

Starts four servers (each tree, batching off and on; PYTHONPATH picks the tree) and, each round,
runs every point against A then B (B then A in odd rounds), so a slow moment of this shared
machine falls on both. Prints the medians per point and B/A. Points: batching off at 16
connections, batching on at 64, as in bench/compare.py's table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import free_port, wait_for_port  # noqa: E402
from compare import BATCHING, TF_PREDICT, V2_INFER, grpc_call_for, h2load, one_row, request_for, wrk  # noqa: E402

from pyserving.tools.example import export_half_plus_two  # noqa: E402


@contextlib.contextmanager
def server(src: str, model: Path, work: Path, batching: bool):
    rest, grpc_port = free_port(), free_port()
    flags = ["--host=127.0.0.1", f"--port={grpc_port}", f"--rest_api_port={rest}", "--model_name=m"]
    flags.append(f"--model_base_path={model}")
    if batching:
        (work / "batching.config").write_text(BATCHING)
        flags += ["--enable_batching", f"--batching_parameters_file={work / 'batching.config'}"]
    env = dict(os.environ, PYTHONPATH=src)
    log = open(work / f"server-{abs(hash((src, batching)))}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pyserving", *flags], env=env, stdout=log, stderr=log)
    try:
        wait_for_port(rest, proc)
        wait_for_port(grpc_port, proc)
        yield rest, grpc_port
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--points", default="grpc,v2grpc,rest")
    parser.add_argument("--download", action="store_true", help="also time 1 MiB float_val answers")
    args = parser.parse_args()
    if args.download:
        download(args.a, args.b, args.rounds)
    wanted = args.points.split(",")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        model = work / "tiny"
        export_half_plus_two(str(model))
        alias, row = one_row(model)
        ports = {
            (tree, batching): stack.enter_context(server(src, model, work, batching))
            for tree, src in (("A", args.a), ("B", args.b))
            for batching in (False, True)
        }
        points = []
        for batching, conns in ((False, 16), (True, 64)):
            label = f"{'batching' if batching else 'no batching'}, {conns} conns"
            if "grpc" in wanted:
                points.append(
                    (f"gRPC Predict, {label}", batching, conns, "grpc", TF_PREDICT, grpc_call_for("x", alias, row)[1])
                )
            if "v2grpc" in wanted:
                points.append(
                    (
                        f"V2 gRPC ModelInfer, {label}",
                        batching,
                        conns,
                        "grpc",
                        V2_INFER,
                        grpc_call_for(" V2 ", alias, row)[1],
                    )
                )
            if "rest" in wanted:
                path, body = request_for("pyserving REST", alias, row)
                points.append((f"REST :predict, {label}", batching, conns, "rest", path, body))
        results: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for name, batching, conns, kind, path, body in points:
                for tree in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                    rest, grpc_port = ports[(tree, batching)]
                    if kind == "grpc":
                        got = h2load(grpc_port, body, conns, args.seconds, work, path)
                    else:
                        got = wrk(f"http://127.0.0.1:{rest}{path}", body, conns, args.seconds, work)
                    if got["errors"]:
                        print(f"  {name} {tree}: {got['errors']} errors", flush=True)
                    results.setdefault((name, tree), []).append(got["rps"])
                    print(f"round {round_} {name} {tree}: {got['rps']:.0f} req/s", flush=True)
        print("\n| point | A req/s (median) | B req/s (median) | B/A | A runs | B runs |")
        print("|---|---:|---:|---:|---|---|")
        for name, *_ in points:
            a, b = statistics.median(results[(name, "A")]), statistics.median(results[(name, "B")])
            runs_a = " ".join(f"{v:.0f}" for v in results[(name, "A")])
            runs_b = " ".join(f"{v:.0f}" for v in results[(name, "B")])
            print(f"| {name} | {a:.0f} | {b:.0f} | {b / a:.2f} | {runs_a} | {runs_b} |")


def download(a: str, b: str, rounds: int) -> None:
    """Milliseconds per gRPC Predict whose answer is 262,144 float32 (1 MiB) in float_val."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        module = tf.Module()
        module.download = tf.function(lambda n: {"y": tf.fill([n], 0.5)}, input_signature=[tf.TensorSpec([], tf.int32)])
        tf.saved_model.save(module, str(work / "big" / "1"), signatures={"download": module.download})
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "m", "download"
        request.inputs["n"].CopyFrom(tf.make_tensor_proto(262144, tf.int32))
        stubs = {}
        for tree, src in (("A", a), ("B", b)):
            _, grpc_port = stack.enter_context(server(src, work / "big", work, False))
            channel = stack.enter_context(
                grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", -1)])
            )
            stubs[tree] = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        times: dict[str, list[float]] = {"A": [], "B": []}
        for round_ in range(rounds * 10):
            for tree in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                started = time.perf_counter()
                response = stubs[tree].Predict(request, timeout=60)
                times[tree].append((time.perf_counter() - started) * 1000)
                assert len(response.outputs["y"].float_val) == 262144
        a_ms, b_ms = statistics.median(times["A"]), statistics.median(times["B"])
        print(f"| gRPC Predict, 1 MiB float_val answer (ms per call) | {a_ms:.1f} | {b_ms:.1f} | {b_ms / a_ms:.2f} |")


if __name__ == "__main__":
    main()

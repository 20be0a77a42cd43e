"""Median latency of one sequential REST predict and one gRPC Predict round trip.

Starts its own pyserving on free loopback ports with the bundled example model
(exported on first use), sends N requests of each kind, prints medians, stops.
Usage: .venv/bin/python bench/roundtrip.py [N]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc
import numpy as np
import requests
from _harness import pyserving
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from pyserving.tools.example import export_half_plus_two


def _time(fn, n: int) -> float:
    for _ in range(min(200, n)):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main(n: int) -> None:
    base = os.path.join(tempfile.mkdtemp(prefix="pyserving-bench-"), "half_plus_two")
    export_half_plus_two(base)
    with pyserving("--model_name=half_plus_two", f"--model_base_path={base}") as (_, grpc_port, rest_port):
        session = requests.Session()
        url = f"http://127.0.0.1:{rest_port}/v1/models/half_plus_two:predict"
        body = b'{"instances": [[1.0], [2.0], [5.0]]}'
        rest_ms = _time(lambda: session.post(url, data=body).raise_for_status(), n)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "half_plus_two"
        request.inputs["x"].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT,
                tensor_content=np.array([[1.0], [2.0], [5.0]], np.float32).tobytes(),
                tensor_shape={"dim": [{"size": 3}, {"size": 1}]},
            )
        )
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            grpc_ms = _time(lambda: stub.Predict(request, timeout=10), n)
        print(f"REST predict round trip, median of {n}: {rest_ms:.3f} ms")
        print(f"gRPC Predict round trip, median of {n}: {grpc_ms:.3f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)

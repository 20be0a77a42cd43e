"""What `--enable_tracing` costs: REST predict req/s on the tiny model (half_plus_two), tracing off vs on.

Three pyserving processes: without the flag, with it (sampler always_on), and with it sampling 1 % of
the traces (traceidratio 0.01); spans go over OTLP/gRPC to a receiver this script runs and counts. Each is
measured with wrk (1 thread) in turn, `--repeats` times, `--seconds` each; the medians and their ratio to
"off" are printed. The idle processes wait while one is measured. Run from the repository root:
`.venv/bin/python bench/tracing.py` (about a minute with the defaults; needs wrk and pyserving[tracing]).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc
import requests
from _harness import free_port, pyserving
from compare import wrk
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pyserving.tools.example import export_half_plus_two


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC receiver that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the gRPC method)
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    sink, port = _Sink(), free_port()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, receiver)
    receiver.add_insecure_port(f"127.0.0.1:{port}")
    receiver.start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    # mode: (extra flags, sampler, sampler argument)
    modes = {
        "off": ((), "always_on", ""),
        "on": (("--enable_tracing",), "always_on", ""),
        "on, 1% sampled": (("--enable_tracing",), "traceidratio", "0.01"),
    }

    with tempfile.TemporaryDirectory(prefix="pyserving-bench-tracing-") as folder, contextlib.ExitStack() as stack:
        work = Path(folder)
        model = work / "tiny"
        export_half_plus_two(str(model))
        body = json.dumps({"instances": [[0.5]]}).encode()
        urls: dict[str, str] = {}
        for mode, (flags, sampler, argument) in modes.items():
            os.environ.update(OTEL_TRACES_SAMPLER=sampler, OTEL_TRACES_SAMPLER_ARG=argument)
            _, _, rest = stack.enter_context(pyserving("--model_name=m", f"--model_base_path={model}", *flags))
            urls[mode] = f"http://127.0.0.1:{rest}/v1/models/m:predict"
        results: dict[str, list[float]] = {mode: [] for mode in modes}
        for url in urls.values():  # each answers, and warms up
            assert requests.post(url, data=body, timeout=30).json() == {"predictions": [[2.25]]}
            wrk(url, body, args.connections, 1.0, work)
        for _ in range(args.repeats):
            for mode, url in urls.items():
                point = wrk(url, body, args.connections, args.seconds, work)
                assert point["errors"] == 0, point
                results[mode].append(point["rps"])
                print(f"{mode:>15}: {point['rps']:6.0f} req/s  p50 {point['p50']:.2f} ms  p99 {point['p99']:.2f} ms")
    receiver.stop(5)
    off = statistics.median(results["off"])
    print(
        f"REST predict, tiny model, {args.connections} connections, {args.seconds:g} s x {args.repeats} taking turns, "
        f"{os.cpu_count()} CPUs (medians); spans received {sink.spans}"
    )
    for mode, runs in results.items():
        median = statistics.median(runs)
        print(f"  {mode:>15}: {median:6.0f} req/s  ({median / off:.3f} of off)  runs {[round(r) for r in runs]}")


if __name__ == "__main__":
    sys.exit(main())

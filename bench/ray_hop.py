"""The Ray Serve hop: the same model through pyserving directly and through Ray Serve's HTTP and gRPC proxies.

One pyserving process (the CLI) and one local Ray cluster (`pyserving.ray_serve:app`, one replica with one
CPU) serve half_plus_two on 127.0.0.1 side by side. wrk (REST predict, batch 1) and h2load (gRPC Predict)
load each for a fixed time; within each repeat the direct and the Ray rows take turns (direct first, then
Ray; the next repeat Ray first), and the median of the repeats is reported with Ray/direct ratios. Needs
`pyserving[ray]`, wrk and h2load (bench/setup installs them).

Usage: bench/ray_hop.py [--seconds 5] [--repeats 3] [--connections 16] [--no-access-log]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
from _harness import free_port, pyserving
from compare import TF_PREDICT, grpc_body, h2load, median_point, wrk

from pyserving.tools.example import export_half_plus_two

BODY = b'{"instances": [[1.0]]}'


def driver(temp_dir: str, http_port: int, grpc_port: int, base: str, access_log: bool) -> None:
    """The Ray side (run as a subprocess of this script): a cluster, Serve, the app; stops at stdin's end."""
    import ray
    from ray import serve

    from pyserving import ray_serve

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1")
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": ray_serve.GRPC_SERVICER_FUNCTIONS},
        logging_config={"enable_access_log": access_log},
    )
    serve.run(ray_serve.app({"model_name": "m", "model_base_path": base}), name="pyserving", route_prefix="/")
    print("ready", flush=True)
    sys.stdin.read()
    serve.shutdown()
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-access-log", action="store_true", help="turn off Ray's per-request access log")
    parser.add_argument("--driver", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.driver[0], int(args.driver[1]), int(args.driver[2]), args.driver[3], args.driver[4] == "on")
        return
    work = Path(tempfile.mkdtemp(prefix="rayhop", dir="/tmp"))
    base = work / "m"
    export_half_plus_two(str(base))
    http_port, grpc_port = free_port(), free_port()
    ray_driver = subprocess.Popen(
        [sys.executable, __file__, "--driver", str(work / "ray"), str(http_port), str(grpc_port), str(base)]
        + ["off" if args.no_access_log else "on"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its cluster's processes are in its session, stopped with it
    )
    try:
        if ray_driver.stdout.readline().strip() != "ready":
            raise RuntimeError("the Ray driver did not start")
        with pyserving("--model_name=m", f"--model_base_path={base}") as (_, direct_grpc, direct_rest):
            targets = {
                "REST direct": ("rest", direct_rest),
                "REST via Ray HTTP proxy": ("rest", http_port),
                "gRPC direct": ("grpc", direct_grpc),
                "gRPC via Ray gRPC proxy": ("grpc", grpc_port),
            }
            grpc_request = grpc_body("x", np.array([[1.0]], np.float32))
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            for repeat in range(args.repeats):
                order = list(targets) if repeat % 2 == 0 else list(reversed(targets))
                for name in order:
                    kind, port = targets[name]
                    if kind == "rest":
                        point = wrk(
                            f"http://127.0.0.1:{port}/v1/models/m:predict", BODY, args.connections, args.seconds, work
                        )
                    else:
                        point = h2load(port, grpc_request, args.connections, args.seconds, work, TF_PREDICT)
                    runs[name].append(point)
    finally:
        if ray_driver.poll() is None:
            ray_driver.stdin.close()
            try:
                ray_driver.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(ray_driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: median_point(points) for name, points in runs.items()}
    print(f"{args.connections} connections, {args.repeats} x {args.seconds:g} s, medians (errors summed)")
    print(f"{'row':<26}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, point in medians.items():
        errors = sum(p["errors"] for p in runs[name])
        print(f"{name:<26}{point['rps']:>10.0f}{point['p50']:>10.2f}{point['p99']:>10.2f}{errors:>8}")
    for kind, direct, via in (
        ("REST", "REST direct", "REST via Ray HTTP proxy"),
        ("gRPC", "gRPC direct", "gRPC via Ray gRPC proxy"),
    ):
        d, r = medians[direct], medians[via]
        print(
            f"{kind}: Ray/direct req/s {r['rps'] / d['rps']:.2f}, p50 {r['p50'] / d['p50']:.1f}x, "
            f"p99 {r['p99'] / d['p99']:.1f}x"
        )
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()

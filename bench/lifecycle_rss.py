"""Is an unloaded version's memory given back? RSS over N load/unload cycles, and the swap time.

Exports a model holding a 64 MiB variable, starts pyserving with a model config
of one always-loaded model, then N times adds the big model with
HandleReloadConfigRequest (the call returns once it is AVAILABLE) and removes it
again (polling status until END), sampling the server's RSS after each unload.
Usage: .venv/bin/python bench/lifecycle_rss.py [N]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc
import tensorflow as tf
from _harness import pyserving
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
)

from pyserving.tools.example import export_half_plus_two

_BIG_FLOATS = 16 * 1024 * 1024  # 64 MiB of float32


class _Big(tf.Module):
    def __init__(self) -> None:
        self.weights = tf.Variable(tf.random.uniform([_BIG_FLOATS]))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def __call__(self, index):
        return {"y": tf.gather(self.weights, index)}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _config(**models: str) -> model_management_pb2.ReloadConfigRequest:
    text = "".join(
        f'config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" }} '
        for name, path in models.items()
    )
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(f"model_config_list {{ {text} }}", request.config)
    return request


def main(cycles: int) -> None:
    work = tempfile.mkdtemp(prefix="pyserving-rss-")
    small, big = os.path.join(work, "small"), os.path.join(work, "big")
    export_half_plus_two(small)
    module = _Big()
    tf.saved_model.save(module, os.path.join(big, "1"), signatures=module.__call__)
    with open(os.path.join(work, "models.config"), "w") as handle:
        handle.write(
            f'model_config_list {{ config {{ name: "small" base_path: "{small}" model_platform: "tensorflow" }} }}'
        )
    with pyserving(f"--model_config_file={work}/models.config") as (proc, grpc_port, _):
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "big"
        baseline = _rss_mib(proc.pid)
        loaded, after, load_s = [], [], []
        for _ in range(cycles):
            started = time.monotonic()
            models.HandleReloadConfigRequest(_config(small=small, big=big), timeout=120)
            load_s.append(time.monotonic() - started)
            loaded.append(_rss_mib(proc.pid))
            models.HandleReloadConfigRequest(_config(small=small), timeout=120)
            while models.GetModelStatus(status, timeout=10).model_version_status[0].state != 50:
                time.sleep(0.05)
            after.append(_rss_mib(proc.pid))
        channel.close()
    print(f"RSS before the first load: {baseline:.0f} MiB (model variable: {_BIG_FLOATS * 4 / 2**20:.0f} MiB)")
    print(f"RSS while loaded: first {loaded[0]:.0f}, last {loaded[-1]:.0f} MiB")
    print(
        f"RSS after unload: first {after[0]:.0f}, last {after[-1]:.0f}, max {max(after):.0f} MiB over {cycles} cycles"
    )
    print(f"reload-to-AVAILABLE: median {statistics.median(load_s):.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)

"""Each runtime's load time and batch-1 latency, against its in-process floor.

For every runtime (a TF1 SavedModel in a Session, a Keras 3 export whose variables need the fixed restore,
a SavedModel served through TF2 signature functions, TFLite, ONNX, and the bench's CNN as a SavedModel and
as ONNX), in one run on 127.0.0.1:
- load: `registry.load` of the version folder in this process (median of 5; the first load, which pays
  imports, is left out);
- floor: `Servable.run` of one row in this process (median over ~1 s of calls): the runtime with nothing of
  the server around it;
- REST and gRPC: pyserving started for the model, one connection, batch 1, wrk and h2load for `--seconds`,
  median p50 of `--repeats` alternating rounds.

Run after `bin/install --test` (the tests' model exporters build the models): `.venv/bin/python bench/runtimes.py`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import numpy as np  # noqa: E402
from compare import export_models, export_onnx_cnn, grpc_body, h2load, request_for, serve, wrk  # noqa: E402

from pyserving.runtimes import registry  # noqa: E402

TFLITE_FLAG = "--prefer_tflite_model=true"


def export_onnx_half_plus_two(base: Path) -> Path:
    """y = 0.5 * x + 2 on x [batch, 1], as ONNX."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "half"], ["xh"]), helper.make_node("Add", ["xh", "two"], ["y"])],
        "half_plus_two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (base / "1").mkdir(parents=True)
    onnx.save(model, str(base / "1" / "model.onnx"))
    return base


def cases(work: Path) -> list[tuple[str, Path, tuple[str, ...]]]:
    """(name, model base path, server flags)."""
    import models
    from tflite_models import tflite_half_plus_two, write_tflite

    bench = export_models(work / "bench")
    tflite = work / "tflite"
    write_tflite(tflite, 1, tflite_half_plus_two("runner"))
    found = [
        ("half_plus_two SavedModel (TF1 Session)", bench["tiny"], ()),
        ("Keras 3 tf.saved_model.save (fixed restore, Session)", models.export_wrapped_keras(work / "keras"), ()),
        ("Keras, TF2 signature functions (fallback)", models.export_identity_read_keras(work / "fallback"), ()),
        ("half_plus_two TFLite", tflite, (TFLITE_FLAG,)),
        ("half_plus_two ONNX", export_onnx_half_plus_two(work / "onnx"), ()),
        ("CNN SavedModel (Keras export)", bench["cnn"], ()),
    ]
    if export_onnx_cnn(bench["onnx-cnn"]) is not None:
        found.append(("CNN ONNX", bench["onnx-cnn"], ()))
    return found


def _newest(base: Path, flags: tuple[str, ...]) -> tuple[str, str, registry.RuntimeOptions]:
    """(version folder, platform, runtime options) as the server started with `flags` serves it."""
    folder = str(sorted(base.iterdir())[-1])
    platform = registry.detect(folder) or registry.TENSORFLOW_PLATFORM
    return folder, platform, registry.RuntimeOptions(prefer_tflite_model=TFLITE_FLAG in flags)


def one_row(base: Path, flags: tuple[str, ...]) -> tuple[str, np.ndarray]:
    """The serving_default input alias and one batch-1 row of 0.5s for it."""
    folder, platform, options = _newest(base, flags)
    alias, info = next(iter(registry.signature_defs(platform, folder, options)["serving_default"].inputs.items()))
    return alias, np.full([1] + [max(d.size, 1) for d in info.tensor_shape.dim[1:]], 0.5, np.float32)


def in_process(base: Path, flags: tuple[str, ...]) -> tuple[float, float]:
    """(median load ms, median Servable.run us) for the newest version folder."""
    folder, platform, options = _newest(base, flags)
    alias, row = one_row(base, flags)
    loads = []
    for attempt in range(6):
        started = time.perf_counter()
        servable = registry.load(platform, folder, options)
        if attempt:
            loads.append((time.perf_counter() - started) * 1e3)
        if attempt < 5:
            servable.close()
    outputs = list(servable.signature_defs["serving_default"].outputs)
    for _ in range(50):  # graph optimisation and first-call costs
        servable.run("serving_default", {alias: row}, outputs, 10_000)
    calls = []
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        servable.run("serving_default", {alias: row}, outputs, 10_000)
        calls.append((time.perf_counter() - started) * 1e6)
    servable.close()
    return statistics.median(loads), statistics.median(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, base, flags in cases(work):
            load_ms, floor_us = in_process(base, flags)
            alias, row = one_row(base, flags)
            path, body = request_for("pyserving", alias, row)
            rest, grpc = [], []
            with serve("pyserving", base, work, flags) as (url, grpc_port):
                for _ in range(args.repeats):
                    rest.append(wrk(url + path, body, 1, args.seconds, work)["p50"])
                    grpc.append(h2load(grpc_port, grpc_body(alias, row), 1, args.seconds, work)["p50"])
            rows.append((name, load_ms, floor_us, statistics.median(rest) * 1e3, statistics.median(grpc) * 1e3))
            print(f"{name}: done", file=sys.stderr)
    print("| runtime and model | load (ms) | in-process floor (us) | REST p50 (us) | gRPC p50 (us) |")
    print("|---|---|---|---|---|")
    for name, load_ms, floor_us, rest_us, grpc_us in rows:
        print(f"| {name} | {load_ms:.1f} | {floor_us:.0f} | {rest_us:.0f} | {grpc_us:.0f} |")
    print(f"\n1 connection, batch 1; {args.repeats} rounds of {args.seconds:g} s per protocol, medians.")


if __name__ == "__main__":
    main()

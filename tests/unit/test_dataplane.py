"""The data plane: TF Serving's predict checks and messages, runtimes from the registry, the loader chain."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from helpers import DoublingServable
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import input_pb2, predict_pb2

from pyserving import metrics
from pyserving.concurrency import _run_into
from pyserving.errors import Code, ServingError
from pyserving.lifecycle.loader import LoaderChain
from pyserving.lifecycle.manager import ModelManager, RetryPolicy, VersionSpec
from pyserving.protocols.tfs.grpc_api import PredictionService
from pyserving.runtimes import registry
from pyserving.runtimes.batching import BatchedServable, Batcher, BatchingOptions
from pyserving.serving import DataPlane, ModelSpec, classify_regress


@pytest.fixture()
def dataplane():
    servable = DoublingServable()
    manager = ModelManager(lambda spec: servable, RetryPolicy(0, 0), load_threads=1, unload_threads=1)
    manager.set_aspired("m", {3: VersionSpec("m", 3, "/m/3", "tensorflow")})
    manager.wait_settled(["m"])
    yield DataPlane(manager, method_name_check=False)
    manager.unload_all()


def _predict(dataplane, signature="double", inputs=None, output_filter=()):
    async def call():
        with dataplane.resolve(ModelSpec("m")) as target:
            return await dataplane.predict(target, signature, inputs or {"x": np.ones(2, np.float32)}, output_filter)

    return asyncio.run(call())


def test_predict_runs_the_resolved_version(dataplane):
    result = _predict(dataplane)
    assert (result.model, result.version, result.signature_name) == ("m", 3, "double")
    assert result.outputs["y"].tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    ("signature", "inputs", "output_filter", "code", "message"),
    [
        ("", None, (), Code.FAILED_PRECONDITION, 'Serving signature key "serving_default" not found.'),
        (
            "double",
            {"z": np.ones(1)},
            (),
            Code.INVALID_ARGUMENT,
            "input tensor alias not found in signature: z. Inputs expected to be in the set {x}.",
        ),
        (
            "double",
            {"x": np.ones(1), "z": np.ones(1)},
            (),
            Code.INVALID_ARGUMENT,
            "input size does not match signature: 2!=1 len({x,z}) != len({x}). Sent extra: {z}. "
            "Missing but required: {}.",
        ),
        (
            "double",
            None,
            ("q",),
            Code.INVALID_ARGUMENT,
            "output tensor alias not found in signature: q Outputs expected to be in the set {y}.",
        ),
        ("double", None, ("y", "y"), Code.INVALID_ARGUMENT, "duplicate output tensor alias: y"),
    ],
)
def test_predict_checks(dataplane, signature, inputs, output_filter, code, message):
    with pytest.raises(ServingError) as info:
        _predict(dataplane, signature, inputs, output_filter)
    assert (info.value.code, info.value.message) == (code, message)


def test_runtime_latency_is_labelled_with_the_servables_runtime(dataplane):
    _predict(dataplane)
    assert ':tensorflow:serving:runtime_latency_count{API="Predict",model_name="m",runtime="numpy"}' in (
        metrics.exposition().decode()
    )


def test_loader_chain_loads_by_platform_and_wraps_for_batching(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 0.5 + 2.0}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.f})
    batcher = Batcher(BatchingOptions(max_batch_size=4))
    warmed = []
    chain = LoaderChain(registry.RuntimeOptions(), batcher, warmup=lambda spec, servable: warmed.append(spec.version))
    servable = chain(VersionSpec("m", 1, str(tmp_path / "1"), registry.TENSORFLOW_PLATFORM))
    try:
        assert isinstance(servable, BatchedServable) and servable.runtime == "TF1"
        assert warmed == [1]
        (alias,) = servable.signature_defs["serving_default"].inputs
        result = servable.run("serving_default", {alias: np.array([1.0, 2.0], np.float32)}, ["y"], 0)
        assert result[0].tolist() == [2.5, 3.0]
    finally:
        servable.close()
        batcher.stop()
    assert registry.platforms() == {"tensorflow", "onnx", "python"}


class _RecordingPool(ThreadPoolExecutor):
    """A worker pool that records what it was given to run (the function `run_sync` hands its worker)."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.ran: list[str] = []

    def submit(self, fn, /, *args, **kwargs):
        called, called_args = fn, args
        if isinstance(getattr(fn, "__self__", None), contextvars.Context):  # run_sync's wrappers:
            called, *called_args = args  # Context.run(_run_into, loop, future, fn, args)
        ran = called_args[2] if called is _run_into else called
        self.ran.append(getattr(ran, "__name__", repr(ran)))
        return super().submit(fn, *args, **kwargs)


def _grpc_request(dims: tuple[int, ...], values: list[float]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "m", "double"
    tensor = request.inputs["x"]
    tensor.dtype = types_pb2.DT_FLOAT
    tensor.float_val.extend(values)
    for size in dims:
        tensor.tensor_shape.dim.add(size=size)
    return request


def test_grpc_predict_expands_compact_tensors_off_the_event_loop(dataplane):
    """A 20-byte request for a 4 MB tensor is decoded on the pool; a small one stays on the loop."""
    pool = _RecordingPool()
    dataplane.max_decoded_bytes = 2**30
    service = PredictionService(dataplane, pool, tensor_content=False)
    with pool:
        small = predict_pb2.PredictResponse.FromString(
            asyncio.run(service._predict(_grpc_request((2,), [1.0, 2.0]), 0))
        )
        assert (small.outputs["y"].float_val, pool.ran) == ([2.0, 4.0], ["run"])  # only the servable's run
        pool.ran.clear()
        compact = predict_pb2.PredictResponse.FromString(
            asyncio.run(service._predict(_grpc_request((1_000_000,), [1.5]), 0))
        )
        assert pool.ran[0] == "decode"
        assert compact.outputs["y"].tensor_shape.dim[0].size == 1_000_000


def test_grpc_predict_refuses_tensors_over_the_decoded_limit(dataplane):
    dataplane.max_decoded_bytes = 1000
    service = PredictionService(dataplane, ThreadPoolExecutor(1), tensor_content=False)
    with pytest.raises(ServingError) as info:
        asyncio.run(service._predict(_grpc_request((100_000_000,), [1.0]), 0))
    assert (info.value.code, info.value.message) == (
        Code.INVALID_ARGUMENT,
        "Input tensor x of shape [100000000] needs 400000000 bytes decoded, over the limit of 1000 bytes "
        "(--max_decoded_tensor_bytes)",
    )


def test_examples_tensor_is_refused_before_the_context_is_copied_into_each_example():
    request_input = input_pb2.Input()
    with_context = request_input.example_list_with_context
    with_context.context.features.feature["f"].bytes_list.value.append(b"x" * 1000)
    for _ in range(100):
        with_context.examples.add()
    context_bytes = len(with_context.context.SerializeToString())
    assert len(classify_regress.serialized_examples(request_input)) == 100
    limit = 100 * (8 + context_bytes) - 1
    with pytest.raises(ServingError) as info:
        classify_regress.serialized_examples(request_input, limit)
    assert info.value.message == (
        f"Input tensor inputs of shape [100] needs {limit + 1} bytes decoded, over the limit of {limit} bytes "
        "(--max_decoded_tensor_bytes)"
    )

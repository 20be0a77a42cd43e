"""The data plane: TF Serving's predict checks and messages, runtimes from the registry, the loader chain."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tensorflow as tf
from helpers import DoublingServable

from pyserving import metrics
from pyserving.errors import Code, ServingError
from pyserving.lifecycle.loader import LoaderChain
from pyserving.lifecycle.manager import ModelManager, RetryPolicy, VersionSpec
from pyserving.runtimes import registry
from pyserving.runtimes.batching import BatchedServable, Batcher, BatchingOptions
from pyserving.serving import DataPlane, ModelSpec


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
    assert registry.platforms() == {"tensorflow"}

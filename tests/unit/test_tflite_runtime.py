"""The TFLite runtime in-process: its interpreter pool under contention, resizing, and refusals."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from tflite_models import tflite_half_plus_two, write_tflite

from pyserving.errors import Code, ServingError
from pyserving.runtimes import registry, tflite_model


@pytest.fixture(scope="module")
def content() -> bytes:
    return tflite_half_plus_two("none")


def test_more_callers_than_interpreters_each_get_their_own_answer(content):
    servable = tflite_model.TfLiteServable(content, 2, 1)

    def call(i: int) -> list[float]:
        x = np.full((i % 5 + 1, 1), float(i), np.float32)  # shapes change between calls: every slot resizes
        return servable.run("serving_default", {"x": x}, ["y"], 0)[0].ravel().tolist()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(400)))
    assert results == [[0.5 * i + 2] * (i % 5 + 1) for i in range(400)]
    servable.close()


def test_a_refused_shape_leaves_the_interpreter_serving(content):
    servable = tflite_model.TfLiteServable(content, 1, 1)
    # 7 to 10 dimensions fail in LiteRT's XNNPACK delegate, 11 and more crash the process: refused before.
    assert servable.run("serving_default", {"x": np.zeros([1] * 6, np.float32)}, ["y"], 0)[0].shape == (1,) * 6
    with pytest.raises(ServingError) as error:
        servable.run("serving_default", {"x": np.zeros([1] * 11, np.float32)}, ["y"], 0)
    assert (error.value.code, error.value.message) == (
        Code.INVALID_ARGUMENT,
        "Input x has 11 dimensions; the TFLite model takes at most 6",
    )
    assert servable.run("serving_default", {"x": np.array([[2.0]], np.float32)}, ["y"], 0)[0].tolist() == [[3.0]]


def test_wrong_dtype_is_refused_before_the_interpreter(content):
    servable = tflite_model.TfLiteServable(content, 1, 1)
    with pytest.raises(ServingError) as error:
        servable.run("serving_default", {"x": np.array([1], np.int64)}, ["y"], 0)
    assert (error.value.code, error.value.message) == (
        Code.INVALID_ARGUMENT,
        "Input x expects float but int64 is provided",
    )


def test_the_registry_prefers_model_tflite_only_with_the_flag(tmp_path, content):
    folder = write_tflite(tmp_path, 1, content)
    servable = registry.load("tensorflow", str(folder), registry.RuntimeOptions(prefer_tflite_model=True))
    assert isinstance(servable, tflite_model.TfLiteServable)
    assert servable.runtime == "TF1"
    with pytest.raises(ServingError) as error:  # without it: the SavedModel runtime, and there is none
        registry.load("tensorflow", str(folder), registry.RuntimeOptions())
    assert error.value.code == Code.NOT_FOUND


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "Cannot build FlatBufferModel from buffer: the file is empty"),
        (b"not a model" * 8, "Cannot build FlatBufferModel from buffer: The model is not a valid Flatbuffer buffer"),
    ],
)
def test_unreadable_files_fail_the_load(content, message):
    with pytest.raises(ServingError) as error:
        tflite_model.TfLiteServable(content, 1, 1)
    assert (error.value.code, error.value.message) == (Code.INVALID_ARGUMENT, message)


def test_an_output_that_is_not_one_row_per_input_row_runs_unsplit(tmp_path):
    import tensorflow as tf

    class Total(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32)])
        def serve(self, x):
            return {"total": tf.reduce_sum(x), "y": x * 2.0}

    module = Total()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    content = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path)).convert()
    servable = tflite_model.TfLiteServable(content, 4, 2)  # 2 per pool: requests above 250 rows are split
    x = np.ones((600, 1), np.float32)
    total, y = servable.run("serving_default", {"x": x}, ["total", "y"], 0)
    assert total.tolist() == 600.0
    assert y.shape == (600, 1) and float(y.sum()) == 1200.0
    (y_only,) = servable.run("serving_default", {"x": x}, ["y"], 0)  # batch-major outputs are split and joined
    assert y_only.shape == (600, 1) and float(y_only.sum()) == 1200.0
    servable.close()

"""`pyserving inspect | convert | warmup` and the Keras classifier helper, on models the tests build."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import HALF_PLUS_TWO, MODELS, get_counter, post, write_config
from models import COLORS, color_image
from tensorflow_serving.apis import prediction_log_pb2

from pyserving.keras_export import export_classifier


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyserving", *args], capture_output=True, text=True, timeout=300)


def ok(*args: str) -> str:
    result = tool(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(*args: str, message: str) -> None:
    result = tool(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def tf1_model(tmp_path_factory) -> dict[str, Path]:
    """A TF1 graph with a variable (y = 3x + 1), saved as a checkpoint and as a frozen graph."""
    folder = tmp_path_factory.mktemp("tf1")
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
        w = tf.compat.v1.Variable(3.0, name="w")
        tf.identity(x * w + 1.0, name="y")
        session.run(tf.compat.v1.global_variables_initializer())
        tf.compat.v1.train.Saver().save(session, str(folder / "ckpt" / "model"))
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(session, graph.as_graph_def(), ["y"])
    (folder / "frozen.pb").write_bytes(frozen.SerializeToString())
    return {"checkpoint": folder / "ckpt", "frozen": folder / "frozen.pb"}


# -- inspect ------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_inspect_json_of_a_base_path():
    description = json.loads(ok("inspect", str(MODELS / "saved_model_half_plus_two_2_versions"), "--json"))
    assert description["versions"] == [123, 124]
    assert description["signatures"]["serving_default"] == {
        "method_name": "tensorflow/serving/predict",
        "inputs": {"x": {"dtype": "DT_FLOAT", "shape": [-1, 1], "name": "x:0"}},
        "outputs": {"y": {"dtype": "DT_FLOAT", "shape": [-1, 1], "name": "y:0"}},
    }
    assert description["signatures"]["classify_x_to_y"]["inputs"]["inputs"] == {
        "dtype": "DT_STRING",
        "shape": None,
        "name": "tf_example:0",
    }


def test_inspect_text_of_a_version_folder():
    text = ok("inspect", str(HALF_PLUS_TWO / "00000123"))
    assert text.startswith("Versions: 123\n")
    assert (
        'Signature "serving_default" (tensorflow/serving/predict)\n  inputs:\n    x: DT_FLOAT [-1, 1] (x:0)\n' in text
    )


def test_inspect_errors(tmp_path):
    fails("inspect", str(tmp_path / "nope"), message=f"pyserving inspect: error: {tmp_path / 'nope'} is not a folder")
    fails("inspect", str(tmp_path), message=f"No SavedModel and no numeric version folder at {tmp_path}")
    fails("inspect", str(HALF_PLUS_TWO), "--tags=gpu", message="No MetaGraph tagged gpu")


# -- convert ------------------------------------------------------------------------------------------


def test_convert_checkpoint_twice_gives_versions_1_and_2_and_they_serve(start_server, tmp_path, tf1_model):
    export = tmp_path / "export"
    for expected in (1, 2):
        out = ok(
            "convert", "checkpoint", str(tf1_model["checkpoint"]), str(export), "--input", "x=x", "--output", "y=y:0"
        )
        assert out.strip() == f"Wrote SavedModel to {export / str(expected)}"
    assert sorted(p.name for p in export.iterdir()) == ["1", "2"]
    server = start_server("--model_name=tf1", f"--model_base_path={export}")
    r = post(server.rest + "/v1/models/tf1:predict", {"instances": [[1.0], [2.0]]})
    assert r.json() == {"predictions": [[4.0], [7.0]]}
    assert json.loads(ok("inspect", str(export), "--json"))["versions"] == [1, 2]


def test_convert_frozen_graph_with_signature_name_and_version(start_server, tmp_path, tf1_model):
    export = tmp_path / "export"
    ok(
        "convert",
        "frozen-graph",
        str(tf1_model["frozen"]),
        str(export),
        "--input",
        "in=x",
        "--output",
        "out=y",
        "--signature_name",
        "scale",
        "--version",
        "7",
    )
    server = start_server("--model_name=frozen", f"--model_base_path={export}")
    r = post(
        server.rest + "/v1/models/frozen/versions/7:predict", {"signature_name": "scale", "inputs": {"in": [[2.0]]}}
    )
    assert r.json() == {"outputs": [[7.0]]}


def test_convert_errors(tmp_path, tf1_model):
    export = str(tmp_path / "export")
    fails(
        "convert",
        "checkpoint",
        str(tf1_model["checkpoint"]),
        export,
        "--input",
        "x=nope",
        "--output",
        "y=y",
        message="Tensor nope:0 (for 'x') is not in the graph",
    )
    fails(
        "convert",
        "checkpoint",
        str(tmp_path),
        export,
        "--input",
        "x=x",
        "--output",
        "y=y",
        message=f"No checkpoint with a .meta graph at {tmp_path}",
    )
    fails(
        "convert",
        "frozen-graph",
        str(tmp_path / "missing.pb"),
        export,
        "--input",
        "x=x",
        "--output",
        "y=y",
        message="Cannot read",
    )
    fails(
        "convert",
        "frozen-graph",
        str(tf1_model["frozen"]),
        export,
        "--input",
        "x",
        "--output",
        "y=y",
        message="Expected ALIAS=TENSOR, got 'x'",
    )
    fails(
        "convert",
        "frozen-graph",
        str(tf1_model["frozen"]),
        export,
        "--input",
        "x=x",
        "--output",
        "y=y",
        "--method",
        "classify",
        message="Not a valid classify signature",
    )
    assert not Path(export).exists() or not any(Path(export).iterdir())


# -- warmup -------------------------------------------------------------------------------------------


def _counter_with_warmup(tmp_path, requests: list[dict]) -> tuple[Path, Path, Path]:
    """A copy of the counter model given warmup records by `pyserving warmup`: (base, requests file, records)."""
    base = tmp_path / "counter"
    shutil.copytree(MODELS / "saved_model_counter", base)
    requests_file = tmp_path / "warmup.json"
    requests_file.write_text(json.dumps(requests))
    out = ok("warmup", str(base), "--requests", str(requests_file))
    written = base / "00000123" / "assets.extra" / "tf_serving_warmup_requests"
    assert out.strip() == f"Wrote {len(requests)} warmup record(s) to {written}"
    return base, requests_file, written


def test_warmup_file_written_by_the_tool_is_replayed_at_load(start_server, tmp_path):
    base, _, _ = _counter_with_warmup(
        tmp_path,
        [
            {"signature_name": "incr_counter_by", "inputs": {"delta": 5.0}},
            {"signature_name": "incr_counter_by", "inputs": {"delta": 2.0}},
        ],
    )
    server = start_server("--model_name=counter", f"--model_base_path={base}")
    assert get_counter(server, "counter") == 7.0


def test_warmup_records_for_a_signature_without_inputs(start_server, tmp_path):
    base, requests_file, written = _counter_with_warmup(
        tmp_path,
        [
            {"signature_name": "incr_counter"},
            {"signature_name": "incr_counter", "inputs": {}},
            {"signature_name": "incr_counter_by", "inputs": {"delta": 5.0}},
        ],
    )
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(written))]
    assert logs[0] == logs[1]
    assert str(logs[0]) == (
        'predict_log {\n  request {\n    model_spec {\n      name: "counter"\n'
        '      signature_name: "incr_counter"\n    }\n  }\n}\n'
    )
    server = start_server("--model_name=counter", f"--model_base_path={base}")
    assert get_counter(server, "counter") == 7.0  # replayed: +1, +1, +5
    requests_file.write_text(json.dumps([{"signature_name": "incr_counter", "instances": [1.0]}]))
    fails(
        "warmup",
        str(base),
        "--requests",
        str(requests_file),
        message='request 0: signature "incr_counter" has no inputs: its request body must name none '
        '(e.g. {"signature_name": "incr_counter"})',
    )


def test_warmup_examples_become_classify_and_regress_records(tmp_path):
    base = tmp_path / "m"
    shutil.copytree(HALF_PLUS_TWO, base)
    requests_file = tmp_path / "warmup.json"
    requests_file.write_text(
        json.dumps(
            [
                {"instances": [1.0, 2.0]},
                {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}]},
                {"signature_name": "regress_x_to_y", "context": {"x": 2.0}, "examples": [{}]},
            ]
        )
    )
    ok("warmup", str(base), "--requests", str(requests_file), "--version", "123")
    file = base / "00000123" / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(file))]
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log", "classify_log", "regress_log"]
    np.testing.assert_array_equal(tf.make_ndarray(logs[0].predict_log.request.inputs["x"]), [1.0, 2.0])
    assert logs[1].classify_log.request.model_spec.signature_name == "classify_x_to_y"
    assert logs[2].regress_log.request.input.example_list_with_context.context.features.feature[
        "x"
    ].float_list.value == [2.0]


def test_warmup_errors(tmp_path):
    base = tmp_path / "m"
    shutil.copytree(HALF_PLUS_TWO, base)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instances": ["text"]}]))
    fails(
        "warmup",
        str(base),
        "--requests",
        str(bad),
        message="request 0: Failed to process element: 0 of "
        "'instances' list. Error: INVALID_ARGUMENT: JSON Value: \"text\" Type: String is not of expected type: float",
    )
    bad.write_text(json.dumps([{"signature_name": "nope", "instances": [1.0]}]))
    fails("warmup", str(base), "--requests", str(bad), message='signature "nope" is not in the model')
    bad.write_text("not json")
    fails("warmup", str(base), "--requests", str(bad), message="is not JSON")
    fails("warmup", str(base), "--requests", str(bad), "--version", "5", message="No version 5 under")
    assert not (base / "00000123" / "assets.extra").exists()


# -- Keras helper -------------------------------------------------------------------------------------


def test_keras_helper_exports_classifiers_that_classify(start_server, tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(400, 2)).astype(np.float32)
    labels = (features[:, 0] > features[:, 1]).astype(np.int64)
    vectors = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(2, activation="softmax")])
    vectors.compile(tf.keras.optimizers.Adam(0.1), "sparse_categorical_crossentropy")
    vectors.fit(features, labels, epochs=30, verbose=0)
    assert export_classifier(vectors, ["low", "high"], str(tmp_path / "vectors")) == str(tmp_path / "vectors" / "1")

    images = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 3)),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(3, activation="softmax"),
        ]
    )
    pixels = rng.uniform(0, 0.3, (600, 8, 8, 3)).astype(np.float32)
    colors = rng.integers(0, 3, 600)
    pixels[np.arange(600), :, :, colors] += 0.7
    images.compile(tf.keras.optimizers.Adam(0.1), "sparse_categorical_crossentropy")
    images.fit(pixels, colors, epochs=40, verbose=0)
    export_classifier(images, list(COLORS), str(tmp_path / "images"), image_feature="image")

    config = write_config(
        tmp_path / "models.config", *({"name": name, "path": tmp_path / name} for name in ("vectors", "images"))
    )
    server = start_server(f"--model_config_file={config}", "--enable_signature_method_name_check=true")
    r = post(server.rest + "/v1/models/vectors:classify", {"examples": [{"x": [3.0, -3.0]}, {"x": [-3.0, 3.0]}]})
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert [label for label, _ in first] == ["low", "high"]
    assert first[1][1] > 0.9 and second[0][1] > 0.9
    body = {"examples": [{"image": {"b64": base64.b64encode(color_image(c)).decode()}} for c in COLORS]}
    results = post(server.rest + "/v1/models/images:classify", body).json()["results"]
    for color, classes in zip(COLORS, results, strict=True):
        best = max(classes, key=lambda pair: pair[1])
        assert best[0] == color and best[1] > 0.9
    info = json.loads(ok("inspect", str(tmp_path / "images"), "--json"))["signatures"]["serving_default"]
    assert info["method_name"] == "tensorflow/serving/classify"
    assert info["inputs"]["inputs"]["dtype"] == "DT_STRING"

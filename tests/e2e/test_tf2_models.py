"""TF2 SavedModels TF1's loader alone cannot serve: Keras exports whose signatures read variables the restore
op does not fill (Keras 3 tf.saved_model.save, MirroredStrategy), and models with ops TensorFlow does not
register (TF Text, custom op libraries)."""

import os
import re

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import copy_version, post, run_cli, wait_for, write_config
from models import export_increment, export_keras_variants, export_text_tokenizer
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

KERAS_VARIANTS = ("keras_export", "keras_saved_model", "keras_mirrored", "legacy_keras")
# TF Text's library holding WhitespaceTokenizeWithOffsetsV2 (found without importing tensorflow_text here).
TEXT_TOKENIZER_LIBRARY = os.path.join(
    os.path.dirname(tf.__file__), os.pardir, "tensorflow_text", "python", "ops", "_whitespace_tokenizer_v2.so"
)
TEXT_PREDICTIONS = {
    "predictions": [
        {"count": 3, "tokens": ["a", "bb", "c"]},
        {"count": 1, "tokens": ["hello", "", ""]},
        {"count": 0, "tokens": ["", "", ""]},
    ]
}
TEXT_INSTANCES = {"instances": ["a bb  c", "hello", " "]}
LAZY_TEXT_IMPORT = "Imported tensorflow_text: a model uses an op TensorFlow does not register"


@pytest.fixture(scope="module")
def keras_server(start_server, tmp_path_factory):
    """One server with every Keras export of y = 2a + 3b + 1 as its own model."""
    bases = export_keras_variants(tmp_path_factory.mktemp("keras"))
    config = write_config(
        tmp_path_factory.mktemp("config") / "models.config",
        *({"name": name, "path": path} for name, path in bases.items()),
    )
    return start_server(f"--model_config_file={config}")


@pytest.mark.parametrize("name", KERAS_VARIANTS)
def test_keras_export_serves_exact_values_over_rest_and_grpc(keras_server, name):
    r = post(f"{keras_server.rest}/v1/models/{name}:predict", {"instances": [[1.0, 2.0], [0.0, -1.0]]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [[9.0], [-2.0]]}
    signature = requests.get(f"{keras_server.rest}/v1/models/{name}/metadata", timeout=10).json()["metadata"][
        "signature_def"
    ]["signature_def"]["serving_default"]
    (alias,) = signature["inputs"]
    (output,) = signature["outputs"]
    request = predict_pb2.PredictRequest(model_spec={"name": name})
    request.inputs[alias].CopyFrom(tf.make_tensor_proto(np.array([[1.0, 2.0]], np.float32)))
    with grpc.insecure_channel(keras_server.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs[output]).tolist() == [[9.0]]
    assert response.model_spec.version.value == 1


def test_keras_export_shapes_stay_unchecked(keras_server):
    """As in TF Serving, an input of another shape than declared reaches the graph; its op's error is a 400."""
    r = post(f"{keras_server.rest}/v1/models/keras_mirrored:predict", {"instances": [[1.0, 2.0, 3.0]]})
    assert r.status_code == 400
    assert "Matrix size-incompatible: In[0]: [1,3], In[1]: [2,1]" in r.json()["error"]


def test_tf_text_model_loads_by_importing_tensorflow_text(start_server, tmp_path):
    base = export_text_tokenizer(tmp_path / "tokenizer")
    server = start_server("--model_name=tokenizer", f"--model_base_path={base}")
    r = post(server.rest + "/v1/models/tokenizer:predict", TEXT_INSTANCES)
    assert r.status_code == 200, r.text
    assert r.json() == TEXT_PREDICTIONS
    assert LAZY_TEXT_IMPORT in server.output()


@pytest.mark.parametrize(
    ("flag", "logged"),
    [
        (f"--custom_op_libraries={TEXT_TOKENIZER_LIBRARY}", f"Loaded custom op library {TEXT_TOKENIZER_LIBRARY}"),
        ("--custom_op_modules=tensorflow_text", "Imported custom op module tensorflow_text"),
    ],
)
def test_custom_op_flags_register_ops_before_models_load(start_server, tmp_path, flag, logged):
    base = export_text_tokenizer(tmp_path / "tokenizer")
    server = start_server("--model_name=tokenizer", f"--model_base_path={base}", flag)
    r = post(server.rest + "/v1/models/tokenizer:predict", TEXT_INSTANCES)
    assert r.json() == TEXT_PREDICTIONS
    assert logged in server.output()
    assert LAZY_TEXT_IMPORT not in server.output()


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        (
            "--custom_op_libraries=/nonexistent/ops.so",
            "Failed to start server. Error: INVALID_ARGUMENT: --custom_op_libraries: cannot load /nonexistent/ops.so: "
            "/nonexistent/ops.so: cannot open shared object file: No such file or directory",
        ),
        (
            "--custom_op_modules=json,pyserving_no_such_module",
            "Failed to start server. Error: INVALID_ARGUMENT: --custom_op_modules: cannot import "
            "pyserving_no_such_module: ModuleNotFoundError: No module named 'pyserving_no_such_module'",
        ),
    ],
)
def test_bad_custom_op_flag_fails_start_up(tmp_path, flag, error):
    result = run_cli("--model_name=m", f"--model_base_path={tmp_path}", "--port=0", "--grpc_socket_path=s", flag)
    assert result.returncode == 255
    assert error in result.stdout.splitlines()


def test_model_needing_an_unregistered_op_fails_its_load_and_the_old_version_serves(start_server, tmp_path):
    base = export_increment(tmp_path / "increment", version=1)
    server = start_server("--model_name=inc", f"--model_base_path={base}", "--max_num_load_retries=0")
    copy_version(export_increment(tmp_path / "staging", version=2, op="PyservingTestMissingOp") / "2", base, 2)

    def version_2_status():
        states = requests.get(server.rest + "/v1/models/inc", timeout=10).json()["model_version_status"]
        return next((s for s in states if s["version"] == "2" and s["state"] == "END"), None)

    status = wait_for(version_2_status, what="version 2 to fail")
    assert status["status"] == {
        "error_code": "NOT_FOUND",
        "error_message": "Op type not registered 'PyservingTestMissingOp': no loaded library registers it "
        "(tensorflow_text is imported). TF Text models need pyserving[text]; register other ops with "
        "--custom_op_libraries=LIB.so or --custom_op_modules=MODULE.",
    }
    r = post(server.rest + "/v1/models/inc:predict", {"instances": [1.5, -1.0]})
    assert r.json() == {"predictions": [2.5, 0.0]}
    assert re.search(r"PyservingTestMissingOp", server.output())

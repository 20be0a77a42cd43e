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
from models import export_identity_read_keras, export_increment, export_keras_variants, export_text_tokenizer
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tf_serving_models import MONITORING_CONFIG_TEXT

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


def test_model_the_session_cannot_restore_serves_through_signature_functions(start_server, tmp_path):
    """A TF2 SavedModel whose variables neither the restore op nor the fixed restore fill, but that
    tf.saved_model.load restores, is served through its signature functions: exact values over REST and
    gRPC, shapes unchecked (the op's own error, a 400), runtime "TF2" in metrics, and one log line why."""
    base = export_identity_read_keras(tmp_path / "identity_read")
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text(MONITORING_CONFIG_TEXT)
    server = start_server("--model_name=keras", f"--model_base_path={base}", f"--monitoring_config_file={monitoring}")
    r = post(f"{server.rest}/v1/models/keras:predict", {"instances": [[1.0, 2.0], [0.0, -1.0], [0.5, 0.5]]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [[9.0], [-2.0], [3.5]]}
    request = predict_pb2.PredictRequest(model_spec={"name": "keras"})
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0, 2.0]], np.float32)))
    with grpc.insecure_channel(server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=30)
        assert tf.make_ndarray(response.outputs["y"]).tolist() == [[9.0]]
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0, 2.0, 3.0]], np.float32)))
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("Matrix size-incompatible: In[0]: [1,3], In[1]: [2,1]\n")
    r = post(f"{server.rest}/v1/models/keras:predict", {"instances": [[1.0, 2.0, 3.0]]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("Matrix size-incompatible: In[0]: [1,3], In[1]: [2,1]\n")
    lines = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=10).text.splitlines()
    assert ':tensorflow:serving:runtime_latency_count{API="Predict",model_name="keras",runtime="TF2"} 2.0' in lines
    # Keras numbers its layer names per process (sequential_1/dense_2/...).
    assert re.search(
        rf"Serving {re.escape(str(base / '1'))} through TF2 signature functions \(runtime TF2\): The signatures "
        r"read variables that the SavedModel does not restore: sequential\w*/dense\w*/bias, "
        r"sequential\w*/dense\w*/kernel\. Neither its restore op nor its object graph's checkpoint keys fill them\.\n",
        server.output(),
    )


def test_model_neither_the_session_nor_tf_saved_model_load_can_restore_fails_at_load(tmp_path):
    """The same model with its object graph's path to the Keras model renamed: TF2's loader matches no
    checkpoint value to the variables either, so the load fails with both reasons."""
    base = export_identity_read_keras(tmp_path / "identity_read")
    file = base / "1" / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(file.read_bytes())
    (child,) = (c for c in saved_model.meta_graphs[0].object_graph_def.nodes[0].children if c.local_name == "model")
    child.local_name = "renamed_model"
    file.write_bytes(saved_model.SerializeToString())
    result = run_cli(
        "--model_name=keras",
        f"--model_base_path={base}",
        "--max_num_load_retries=0",
        "--port=0",
        f"--grpc_socket_path={tmp_path / 's'}",
    )
    assert result.returncode == 255
    assert re.search(
        r"\{name: keras version: 1\} due to error: FAILED_PRECONDITION: The signatures read variables that the "
        r"SavedModel does not restore: sequential\w*/dense\w*/bias, sequential\w*/dense\w*/kernel\. Neither its "
        r"restore op nor its object graph's checkpoint keys fill them\. tf.saved_model.load cannot serve it either: "
        r"Found 2 Python objects that were not bound to checkpointed values",
        result.stdout,
    )

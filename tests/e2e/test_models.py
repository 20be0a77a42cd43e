"""TF1 and TF2 SavedModels load and answer: TF Serving's test models (as the tests export them) and others."""

import re
import shutil
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import HALF_PLUS_TWO, MODELS, post, run_cli
from models import export_wrapped_keras
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

# The variants only TF Serving's own files have (GPU, TensorRT, MKL, MLMD, saved_model_config) are
# served in tests/crosscheck, where those files are present.
HALF_PLUS_TWO_FAMILY = [
    "saved_model_half_plus_two_cpu",
    "saved_model_half_plus_two_2_versions",
    "saved_model_half_plus_two_tf2_cpu",
]


@pytest.mark.smoke
@pytest.mark.parametrize("folder", HALF_PLUS_TWO_FAMILY)
def test_half_plus_two_variants(start_server, folder):
    server = start_server("--model_name=m", f"--model_base_path={MODELS / folder}")
    r = post(server.rest + "/v1/models/m:predict", {"instances": [1.0, 2.0, 5.0]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [2.5, 3.0, 4.5]}
    newest = "124" if folder.endswith("2_versions") else "123"
    assert requests.get(server.rest + "/v1/models/m").json()["model_version_status"][0]["version"] == newest


@pytest.mark.smoke
def test_half_plus_three(start_server):
    server = start_server("--model_name=h3", f"--model_base_path={MODELS / 'saved_model_half_plus_three'}")
    assert post(server.rest + "/v1/models/h3:predict", {"instances": [2.0]}).json() == {"predictions": [4.0]}


def test_matrix_half_plus_two(start_server):
    server = start_server("--model_name=matrix", f"--model_base_path={MODELS / 'batching' / 'matrix_half_plus_two'}")
    matrix = np.arange(9, dtype=np.float32).reshape(3, 3)
    r = post(server.rest + "/v1/models/matrix:predict", {"instances": [matrix.tolist()]})
    assert r.json() == {"predictions": [(matrix * 0.5 + 2).tolist()]}


@pytest.mark.smoke
def test_stateful_counter_keeps_state(start_server):
    server = start_server("--model_name=counter", f"--model_base_path={MODELS / 'saved_model_counter'}")
    with grpc.insecure_channel(server.grpc) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)

        def call(signature, delta=None):
            request = predict_pb2.PredictRequest(model_spec={"name": "counter", "signature_name": signature})
            if delta is not None:
                request.inputs["delta"].CopyFrom(tf.make_tensor_proto(delta, dtype=tf.float32))
            return stub.Predict(request, timeout=30).outputs["output"].float_val[0]

        assert call("get_counter") == 0
        assert call("incr_counter") == 1
        assert call("incr_counter") == 2
        assert call("incr_counter_by", 10.0) == 12
        assert call("reset_counter") == 0
    r = post(server.rest + "/v1/models/counter:predict", {"signature_name": "get_counter", "instances": [1]})
    assert r.status_code == 400
    assert r.json() == {"error": "Failed to get input map for signature: get_counter"}


def test_missing_base_path_waits_then_serves(start_server, tmp_path):
    base = tmp_path / "arrives_later"
    server = start_server("--model_name=late", f"--model_base_path={base}", ready=False)
    deadline = time.monotonic() + 60
    while "Could not find base path" not in server.output():
        assert time.monotonic() < deadline, server.output()
        assert server.proc.poll() is None
        time.sleep(0.2)
    assert f"Could not find base path {base} for servable late" in server.output()
    shutil.copytree(HALF_PLUS_TWO, base)
    server.wait_ready(model_may_be_missing=True)
    assert post(server.rest + "/v1/models/late:predict", {"instances": [1.0]}).json() == {"predictions": [2.5]}


def test_base_path_without_versions_waits_with_warning(start_server, tmp_path):
    (tmp_path / "model" / "assets").mkdir(parents=True)
    server = start_server("--model_name=nov", f"--model_base_path={tmp_path / 'model'}", ready=False)
    deadline = time.monotonic() + 60
    while "No versions of servable nov found under base path" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.2)
    assert server.proc.poll() is None
    assert "Running gRPC ModelServer" not in server.output()  # ports open only after the initial load


def test_sigterm_exits_zero_and_logs(start_server):
    server = start_server(
        "--model_name=m",
        f"--model_base_path={MODELS / 'saved_model_half_plus_two_cpu'}",
        "--use_alts_credentials=false",
    )
    output = server.output()
    assert "Running gRPC ModelServer at 127.0.0.1:" in output
    assert "Exporting HTTP/REST API at:localhost:" in output
    assert (
        "Flag --use_alts_credentials is accepted but has no effect in this pyserving release (not supported)."
    ) in output
    assert "Flag --port is accepted" not in output
    assert server.stop() == 0


def test_keras_model_saved_inside_a_module_serves(start_server, tmp_path):
    """Its restore op fills other variable handles than its signature reads; the object graph's keys restore them."""
    base = export_wrapped_keras(tmp_path / "wrapped")
    server = start_server("--model_name=wrapped", f"--model_base_path={base}")
    r = post(server.rest + "/v1/models/wrapped:predict", {"instances": [[1.0, 2.0], [0.5, 0.0]]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [[9.0], [2.0]]}


def test_model_whose_signature_reads_variables_nothing_restores_fails_at_load(tmp_path):
    """Without its object graph, nothing keys the variables the signature reads (TF's own loader fails too)."""
    base = export_wrapped_keras(tmp_path / "wrapped")
    file = base / "1" / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(file.read_bytes())
    saved_model.meta_graphs[0].ClearField("object_graph_def")
    file.write_bytes(saved_model.SerializeToString())
    result = run_cli(
        "--model_name=wrapped",
        f"--model_base_path={base}",
        "--max_num_load_retries=0",
        "--port=0",
        f"--grpc_socket_path={tmp_path / 's'}",
    )
    assert result.returncode == 255
    # Keras numbers its layer names per process (sequential_1/dense_2/...).
    assert re.search(
        r"\{name: wrapped version: 1\} due to error: FAILED_PRECONDITION: The signatures read variables "
        r"that the SavedModel does not restore: "
        r"sequential\w*/dense\w*/bias, sequential\w*/dense\w*/kernel\. "
        r"Neither its restore op nor its object graph's checkpoint keys fill them\.",
        result.stdout,
    )

"""Cross-check against TF Serving's own test files (../shared/testdata/tf_serving), when they are present.

The main tiers export their own copies of these models (`tests/tf_serving_models.py`); this module
checks that those copies match TF Serving's files, and serves the variants only the files have
(written by TensorFlow 1.x to 2.14: GPU, TensorRT, MKL, MLMD, saved_model_config). A clone without
the folder skips the whole module with one line saying so.
"""

from __future__ import annotations

import json

import grpc
import pytest
import requests
import tensorflow as tf
from helpers import MODELS, SHARED_TESTDATA, post, run_cli
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

if SHARED_TESTDATA is None:
    pytest.skip(
        "TF Serving's test files (../shared/testdata/tf_serving, or $PYSERVING_TESTDATA) are not here: "
        "cross-check skipped; the main tiers export their own models",
        allow_module_level=True,
    )

GENERATED = [
    "saved_model_half_plus_two_cpu/00000123",
    "saved_model_half_plus_two_2_versions/00000123",
    "saved_model_half_plus_two_2_versions/00000124",
    "saved_model_half_plus_two_tf2_cpu/00000123",
    "saved_model_half_plus_three/00000123",
    "saved_model_counter/00000123",
    "batching/matrix_half_plus_two/1",
]
ONLY_IN_FILES = [
    "saved_model_half_plus_two_gpu",
    "saved_model_half_plus_two_gpu_trt",
    "saved_model_half_plus_two_mkl",
    "saved_model_half_plus_two_mlmd",
    "saved_model_half_plus_two_cpu_with_saved_model_config",
    "saved_model_half_plus_two_cpu_with_empty_saved_model_config",
]


def _signatures(version_dir) -> dict:
    saved_model = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    (meta_graph,) = [m for m in saved_model.meta_graphs if list(m.meta_info_def.tags) == ["serve"]]
    return {
        key: (
            signature.method_name,
            {alias: (info.name, info.dtype, str(info.tensor_shape)) for alias, info in signature.inputs.items()},
            {alias: (info.name, info.dtype, str(info.tensor_shape)) for alias, info in signature.outputs.items()},
        )
        for key, signature in meta_graph.signature_def.items()
    }


@pytest.mark.parametrize("folder", GENERATED)
def test_exported_copies_have_tf_servings_signatures(folder):
    assert _signatures(MODELS / folder) == _signatures(SHARED_TESTDATA / folder)


@pytest.mark.parametrize(
    "folder", ["saved_model_half_plus_two_cpu", "saved_model_half_plus_two_2_versions", *ONLY_IN_FILES]
)
def test_tf_servings_half_plus_two_files_serve(start_server, folder):
    server = start_server("--model_name=m", f"--model_base_path={SHARED_TESTDATA / folder}")
    assert post(server.rest + "/v1/models/m:predict", {"instances": [1.0, 2.0, 5.0]}).json() == {
        "predictions": [2.5, 3.0, 4.5]
    }
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}
    assert post(server.rest + "/v1/models/m:regress", body).json() == {"results": [3.0]}


def test_tf_servings_metadata_file_matches_the_answer(start_server):
    folder = SHARED_TESTDATA / "saved_model_half_plus_two_cpu"
    server = start_server("--model_name=half_plus_two", f"--model_base_path={folder}")
    expected = json.loads((SHARED_TESTDATA / "half_plus_two_model_metadata.json").read_text())
    expected["model_spec"]["name"] = "half_plus_two"
    assert requests.get(server.rest + "/v1/models/half_plus_two/metadata", timeout=30).json() == expected


def test_tf_servings_half_plus_three_counter_and_matrix_files(start_server):
    config = {
        "three": "saved_model_half_plus_three",
        "counter": "saved_model_counter",
        "matrix": "batching/matrix_half_plus_two",
    }
    servers = {
        name: start_server(f"--model_name={name}", f"--model_base_path={SHARED_TESTDATA / folder}")
        for name, folder in config.items()
    }
    assert post(servers["three"].rest + "/v1/models/three:predict", {"instances": [2.0]}).json() == {
        "predictions": [4.0]
    }
    assert post(servers["matrix"].rest + "/v1/models/matrix:predict", {"instances": [[[0.0] * 3] * 3]}).json() == {
        "predictions": [[[2.0] * 3] * 3]
    }
    with grpc.insecure_channel(servers["counter"].grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        answers = []
        for signature in ("incr_counter", "incr_counter", "get_counter", "reset_counter"):
            request = predict_pb2.PredictRequest(model_spec={"name": "counter", "signature_name": signature})
            answers.append(tf.make_ndarray(stub.Predict(request, timeout=30).outputs["output"]).item())
    assert answers == [1.0, 2.0, 2.0, 0.0]


def test_tf_servings_bad_model_fails_to_load(tmp_path):
    bad = SHARED_TESTDATA / "bad_half_plus_two"
    result = run_cli(
        "--model_name=bad",
        f"--model_base_path={bad}",
        "--max_num_load_retries=0",
        "--port=0",
        f"--grpc_socket_path={tmp_path / 's'}",
    )
    assert result.returncode == 255
    assert "Could not find SavedModel .pb or .pbtxt at supplied export directory path" in result.stdout

"""TF Serving's TFLite test models (../shared/testdata/tf_serving), served with `--prefer_tflite_model`.

testPredictOnTfLite and testPredictWithSignatureDefOnTfLite on TF Serving's own files; the
converted copies in `tflite_models` against them; and `parse_example_tflite`, whose ParseExampleV2
custom op the Python interpreter cannot provide, failing its load with a message naming the op.
"""

from __future__ import annotations

import grpc
import pytest
import requests
from helpers import SHARED_TESTDATA, grpc_predict, post, run_cli
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tflite_models import tflite_half_plus_two, write_tflite

from pyserving.runtimes import tflite_model
from pyserving.runtimes.registry import RuntimeOptions

if SHARED_TESTDATA is None:
    pytest.skip(
        "TF Serving's test files (../shared/testdata/tf_serving, or $PYSERVING_TESTDATA) are not here: "
        "TFLite cross-check skipped; tests/e2e/test_tflite.py converts its own models",
        allow_module_level=True,
    )

# (folder, the kind of copy tflite_models converts, the metadata's input tensor name)
MODELS = [
    ("saved_model_half_plus_two_tflite", "none", "x"),
    ("saved_model_half_plus_two_tflite_with_sigdef", "metadata", "tflite_input"),
]


def _described(signatures: dict) -> dict:
    return {
        key: (
            s.method_name,
            {a: (i.name, i.dtype, [d.size for d in i.tensor_shape.dim]) for a, i in s.inputs.items()},
            {a: (i.name, i.dtype, [d.size for d in i.tensor_shape.dim]) for a, i in s.outputs.items()},
        )
        for key, s in signatures.items()
    }


@pytest.mark.parametrize(("folder", "kind", "x_name"), MODELS, ids=[m[0] for m in MODELS])
def test_converted_copies_have_tf_servings_signatures(tmp_path, folder, kind, x_name):
    copy = write_tflite(tmp_path, 1, tflite_half_plus_two(kind))
    original = _described(tflite_model.signature_defs(str(SHARED_TESTDATA / folder / "00000123"), RuntimeOptions()))
    assert _described(tflite_model.signature_defs(str(copy), RuntimeOptions())) == original
    predict = "tensorflow/serving/predict"
    assert original == {
        "serving_default": (
            predict,
            {"x": (x_name, types_pb2.DT_FLOAT, [1, 1])},
            {"y": ("y", types_pb2.DT_FLOAT, [1, 1])},
        )
    }


@pytest.mark.parametrize(("folder", "kind", "x_name"), MODELS, ids=[m[0] for m in MODELS])
def test_tf_servings_tflite_files_serve_grpc_predict(start_server, folder, kind, x_name):
    server = start_server(
        "--model_name=default", f"--model_base_path={SHARED_TESTDATA / folder}", "--prefer_tflite_model=true"
    )
    # TF Serving's VerifyPredictRequest (specify_output=False): x = [2.0], shape [1].
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = "serving_default"
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.append(2.0)
    request.inputs["x"].tensor_shape.dim.add().size = 1
    with grpc.insecure_channel(server.grpc) as channel:
        result = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        assert result.outputs["y"].dtype == types_pb2.DT_FLOAT
        assert list(result.outputs["y"].float_val) == [3.0]
        assert (result.model_spec.name, result.model_spec.version.value) == ("default", 123)
        assert result.model_spec.signature_name == "serving_default"
        assert list(grpc_predict(channel, "default", x=(1.0, 2.0, 5.0)).outputs["y"].float_val) == [2.5, 3.0, 4.5]
    r = post(f"{server.rest}/v1/models/default:predict", {"instances": [1.0, 2.0, 5.0]})
    assert (r.status_code, r.json()) == (200, {"predictions": [2.5, 3.0, 4.5]})
    metadata = requests.get(f"{server.rest}/v1/models/default/metadata", timeout=10).json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["x"]["name"] == x_name


def test_parse_example_tflite_fails_its_load_naming_the_custom_op(tmp_path):
    result = run_cli(
        "--model_name=parse",
        f"--model_base_path={SHARED_TESTDATA / 'parse_example_tflite'}",
        "--prefer_tflite_model=true",
        "--max_num_load_retries=0",
        "--port=0",
        f"--grpc_socket_path={tmp_path / 's'}",
    )
    assert result.returncode == 255
    assert (
        "Failed to start server. Error: UNKNOWN: 1 servable(s) did not become available: "
        "{{{name: parse version: 123} due to error: INTERNAL: Failed to allocate tensors: "
        "Encountered unresolved custom op: ParseExampleV2. See instructions: "
        "https://www.tensorflow.org/lite/guide/ops_custom Node number 0 (ParseExampleV2) failed to prepare. "
        "pyserving's TFLite interpreter (ai-edge-litert) has LiteRT's built-in ops only.}, }\n"
    ) in result.stdout

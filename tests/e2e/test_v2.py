"""The Open Inference Protocol (KServe V2) end to end, through Triton's own clients (tritonclient's HTTP and
gRPC clients, sync, async and asyncio) and raw HTTP where a client hides the details.

One server holds every model here: `dtypes` (versions 1 and 2, labelled stable and canary; a signature per
V2 datatype), the TF1 `half_plus_two`, an ONNX `scaler` and a TFLite `tflite`. Errors and the model
repository extension are test_v2_errors.py's; batching, metrics, TLS and the drain test_v2_operations.py's.
"""

from __future__ import annotations

import asyncio
import json
import queue
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from helpers import HALF_PLUS_TWO, assert_v2_error, assert_v2_rest_error, post, v2_grpc_input, v2_http_input
from models import export_v2_types
from onnx_models import export_onnx_scaler
from tflite_models import tflite_half_plus_two, write_tflite
from tritonclient.utils import InferenceServerException

import pyserving

EXTENSIONS = ["binary_tensor_data", "model_repository"]
A = np.array([1.0, 2.5, -4.0], np.float32)
B = np.array([3.0, 0.5, 2.0], np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v2")
    export_v2_types(root / "dtypes", 1)
    export_v2_types(root / "dtypes", 2)
    export_onnx_scaler(root / "scaler", 1)
    write_tflite(root / "tflite", 1, tflite_half_plus_two("runner"))
    config = root / "models.config"
    config.write_text(
        "model_config_list {\n"
        f'  config {{ name: "dtypes" base_path: "{root / "dtypes"}" model_platform: "tensorflow"\n'
        "    model_version_policy { specific { versions: 1 versions: 2 } }\n"
        '    version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 } }\n'
        f'  config {{ name: "half_plus_two" base_path: "{HALF_PLUS_TWO}" model_platform: "tensorflow" }}\n'
        f'  config {{ name: "scaler" base_path: "{root / "scaler"}" model_platform: "onnx" }}\n'
        f'  config {{ name: "tflite" base_path: "{root / "tflite"}" model_platform: "tensorflow" }}\n'
        "}\n"
    )
    return root


@pytest.fixture(scope="module")
def server(start_server, repo):
    return start_server(
        f"--model_config_file={repo / 'models.config'}",
        "--allow_version_labels_for_unavailable_models",
        "--prefer_tflite_model=true",
    )


def http_ab(binary_a: bool = True, binary_b: bool = True, a=A, b=B) -> list[httpclient.InferInput]:
    return [v2_http_input("a", a, "FP32", binary_a), v2_http_input("b", b, "FP32", binary_b)]


def grpc_ab(a=A, b=B) -> list[grpcclient.InferInput]:
    return [v2_grpc_input("a", a, "FP32"), v2_grpc_input("b", b, "FP32")]


def grpc_metadata(response) -> dict:
    """A gRPC ModelMetadataResponse as the REST document (shapes as integers)."""

    def tensors(items):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }


# -- health and metadata ----------------------------------------------------------------------------


def test_server_health_and_metadata(server, http, grpc_client):
    assert http.is_server_live() is True
    assert http.is_server_ready() is True
    metadata = {"name": "pyserving", "version": pyserving.__version__, "extensions": EXTENSIONS}
    assert http.get_server_metadata() == metadata
    assert grpc_client.is_server_live() is True
    assert grpc_client.is_server_ready() is True
    response = grpc_client.get_server_metadata()
    assert (response.name, response.version, list(response.extensions)) == tuple(metadata.values())
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}), ("/v2", metadata)):
        r = requests.get(server.rest + path, timeout=10)
        assert (r.status_code, r.headers["content-type"], r.json()) == (200, "application/json", body)


@pytest.mark.parametrize(
    "version, ready",
    [("", True), ("1", True), ("2", True), ("stable", True), ("canary", True), ("7", False), ("nolabel", False)],
)
def test_model_ready(server, http, grpc_client, version, ready):
    assert http.is_model_ready("dtypes", version) is ready
    assert grpc_client.is_model_ready("dtypes", version) is ready
    path = f"/v2/models/dtypes/versions/{version}/ready" if version else "/v2/models/dtypes/ready"
    r = requests.get(server.rest + path, timeout=10)
    # Not ready is a 4xx, as the protocol asks (Triton answers 400 too).
    assert (r.status_code, r.json()) == (200 if ready else 400, {"name": "dtypes", "ready": ready})


def test_unknown_model_is_not_found(server, http, grpc_client):
    r = requests.get(server.rest + "/v2/models/nope/ready", timeout=10)
    assert_v2_rest_error(r, 404, "Model nope is not served")
    assert http.is_model_ready("nope") is False  # the HTTP client reads any non-200 as not ready
    with pytest.raises(InferenceServerException) as error:
        grpc_client.is_model_ready("nope")
    assert_v2_error(error, "StatusCode.NOT_FOUND", "Model nope is not served")
    with pytest.raises(InferenceServerException) as error:
        http.get_model_metadata("nope")
    assert_v2_error(error, "404", "Servable not found for request: Latest(nope)")
    with pytest.raises(InferenceServerException) as error:
        grpc_client.get_model_metadata("nope")
    assert_v2_error(error, "StatusCode.NOT_FOUND", "Servable not found for request: Latest(nope)")


def _tensor(name: str, datatype: str, shape: list[int]) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape}


METADATA = {
    "dtypes": {
        "name": "dtypes",
        "versions": ["1", "2"],
        "platform": "tensorflow",
        "inputs": [_tensor("a", "FP32", [-1]), _tensor("b", "FP32", [-1])],
        "outputs": [_tensor("diff", "FP32", [-1]), _tensor("scaled", "FP32", [-1]), _tensor("sum", "FP32", [-1])],
    },
    "half_plus_two": {
        "name": "half_plus_two",
        "versions": ["123"],
        "platform": "tensorflow",
        "inputs": [_tensor("x", "FP32", [-1, 1])],
        "outputs": [_tensor("y", "FP32", [-1, 1])],
    },
    "scaler": {
        "name": "scaler",
        "versions": ["1"],
        "platform": "onnx",
        "inputs": [_tensor("k", "INT64", [-1]), _tensor("x", "FP32", [-1, 3])],
        "outputs": [_tensor("next", "INT64", [-1]), _tensor("scaled", "FP32", [-1, 3]), _tensor("total", "FP32", [-1])],
    },
    # The platform as the model config names it; the shapes of the interpreter's tensors, as TF Serving's
    # metadata of a TFLite model has them (test_tflite), though the batch dimension resizes.
    "tflite": {
        "name": "tflite",
        "versions": ["1"],
        "platform": "tensorflow",
        "inputs": [_tensor("x", "FP32", [1, 1])],
        "outputs": [_tensor("y", "FP32", [1, 1])],
    },
}


@pytest.mark.parametrize("name", sorted(METADATA))
def test_model_metadata(http, grpc_client, name):
    assert http.get_model_metadata(name) == METADATA[name]
    assert grpc_metadata(grpc_client.get_model_metadata(name)) == METADATA[name]
    version = METADATA[name]["versions"][0]
    assert http.get_model_metadata(name, version) == METADATA[name]
    assert grpc_metadata(grpc_client.get_model_metadata(name, version)) == METADATA[name]


# -- infer ------------------------------------------------------------------------------------------


def expected_arithmetic(version: int = 2, a=A, b=B) -> dict[str, np.ndarray]:
    return {"diff": a - b, "scaled": a * np.float32(version), "sum": a + b}


def assert_outputs(result, expected: dict[str, np.ndarray]) -> None:
    for name, values in expected.items():
        array = result.as_numpy(name)
        assert array.dtype == values.dtype, name
        np.testing.assert_array_equal(array, values, err_msg=name)


@pytest.mark.parametrize(
    "binary_a, binary_b, binary_out",
    [(False, False, False), (True, True, True), (False, True, False), (True, False, True)],
)
def test_http_infer_json_binary_and_mixed(http, binary_a, binary_b, binary_out):
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary_out) for name in ("sum", "diff", "scaled")]
    outputs[1] = httpclient.InferRequestedOutput("diff", binary_data=not binary_out)  # outputs mixed too
    result = http.infer("dtypes", http_ab(binary_a, binary_b), outputs=outputs, request_id="req-7")
    assert_outputs(result, expected_arithmetic())
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("dtypes", "2", "req-7")
    described = {entry["name"]: entry for entry in response["outputs"]}
    assert sorted(described) == ["diff", "scaled", "sum"]
    for name, entry in described.items():
        binary = binary_out if name != "diff" else not binary_out
        assert (entry["datatype"], entry["shape"]) == ("FP32", [3])
        if binary:
            assert entry["parameters"] == {"binary_data_size": 12}
            assert "data" not in entry
        else:
            assert entry["data"] == expected_arithmetic()[name].tolist()


def test_http_infer_raw_body(server):
    """The binary extension on the wire: JSON header, Inference-Header-Content-Length, raw tensors after it."""
    header = {
        "id": "raw-1",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 12}},
            {"name": "b", "datatype": "FP32", "shape": [3], "data": B.tolist()},
        ],
        "outputs": [{"name": "sum", "parameters": {"binary_data": True}}, {"name": "diff"}],
    }
    head = json.dumps(header).encode()
    r = post(
        server.rest + "/v2/models/dtypes/infer",
        head + A.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers["inference-header-content-length"])
    assert json.loads(r.content[:length]) == {
        "model_name": "dtypes",
        "model_version": "2",
        "id": "raw-1",
        "outputs": [
            {"name": "sum", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 12}},
            {"name": "diff", "datatype": "FP32", "shape": [3], "data": (A - B).tolist()},
        ],
    }
    assert r.content[length:] == (A + B).tobytes()
    # binary_data_output asks for every output raw (in the signature's order when none is named).
    body = {"parameters": {"binary_data_output": True}, "inputs": [dict(header["inputs"][1], name="a")]}
    body["inputs"].append(header["inputs"][1])
    r = post(server.rest + "/v2/models/dtypes/infer", body)
    length = int(r.headers["inference-header-content-length"])
    described = json.loads(r.content[:length])["outputs"]
    assert [(entry["name"], entry["parameters"]) for entry in described] == [
        ("diff", {"binary_data_size": 12}),
        ("scaled", {"binary_data_size": 12}),
        ("sum", {"binary_data_size": 12}),
    ]
    assert r.content[length:] == (B - B).tobytes() + (B * 2).tobytes() + (B + B).tobytes()


def test_requested_outputs_subset(http, grpc_client):
    result = http.infer("dtypes", http_ab(), outputs=[httpclient.InferRequestedOutput("sum")])
    assert [entry["name"] for entry in result.get_response()["outputs"]] == ["sum"]
    np.testing.assert_array_equal(result.as_numpy("sum"), A + B)
    result = grpc_client.infer("dtypes", grpc_ab(), outputs=[grpcclient.InferRequestedOutput("scaled")])
    assert [output.name for output in result.get_response().outputs] == ["scaled"]
    np.testing.assert_array_equal(result.as_numpy("scaled"), A * 2)


def test_grpc_infer(grpc_client):
    result = grpc_client.infer("dtypes", grpc_ab(), request_id="req-8")
    assert_outputs(result, expected_arithmetic())
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("dtypes", "2", "req-8")
    # Outputs always come back raw, described in order.
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("diff", "FP32", [3]),
        ("scaled", "FP32", [3]),
        ("sum", "FP32", [3]),
    ]
    assert list(response.raw_output_contents) == [(A - B).tobytes(), (A * 2).tobytes(), (A + B).tobytes()]


def test_sync_clients_async_calls(http, grpc_client):
    pending = [http.async_infer("dtypes", http_ab(a=A + i), request_id=f"h{i}") for i in range(4)]
    for i, call in enumerate(pending):
        result = call.get_result(timeout=30)
        assert result.get_response()["id"] == f"h{i}"
        assert_outputs(result, expected_arithmetic(a=A + i))
    answers: queue.Queue = queue.Queue()
    for i in range(4):
        grpc_client.async_infer(
            "dtypes", grpc_ab(a=A + i), lambda result, error: answers.put((result, error)), request_id=f"g{i}"
        )
    seen = set()
    for _ in range(4):
        result, error = answers.get(timeout=30)
        assert error is None
        i = int(result.get_response().id[1:])
        seen.add(i)
        assert_outputs(result, expected_arithmetic(a=A + i))
    assert seen == {0, 1, 2, 3}
    grpc_client.async_infer("nope", grpc_ab(), lambda result, error: answers.put((result, error)))
    result, error = answers.get(timeout=30)
    assert result is None
    assert (error.status(), error.message()) == (
        "StatusCode.NOT_FOUND",
        "Servable not found for request: Latest(nope)",
    )


def test_asyncio_clients(server):
    async def run():
        async with httpaio.InferenceServerClient(server.rest.removeprefix("http://")) as http_aio:
            assert await http_aio.is_server_ready() is True
            assert await http_aio.is_model_ready("dtypes", "stable") is True
            assert (await http_aio.get_model_metadata("dtypes"))["versions"] == ["1", "2"]
            inputs = [[v2_http_input("a", A + i, "FP32", i % 2 == 0), v2_http_input("b", B, "FP32")] for i in range(3)]
            results = await asyncio.gather(*(http_aio.infer("dtypes", x, model_version="1") for x in inputs))
            for i, result in enumerate(results):
                assert_outputs(result, expected_arithmetic(1, a=A + i))
            with pytest.raises(InferenceServerException) as error:
                await http_aio.infer("nope", inputs[0])
            assert_v2_error(error, "404", "Servable not found for request: Latest(nope)")
        async with grpcaio.InferenceServerClient(server.grpc) as grpc_aio:
            assert await grpc_aio.is_server_live() is True
            assert await grpc_aio.is_model_ready("dtypes", "canary") is True
            assert list((await grpc_aio.get_model_metadata("dtypes")).versions) == ["1", "2"]
            calls = [grpc_aio.infer("dtypes", grpc_ab(a=A + i), model_version="stable") for i in range(3)]
            for i, result in enumerate(await asyncio.gather(*calls)):
                assert result.get_response().model_version == "1"
                assert_outputs(result, expected_arithmetic(1, a=A + i))
            with pytest.raises(InferenceServerException) as error:
                await grpc_aio.infer("dtypes", grpc_ab(), model_version="nolabel")
            assert_v2_error(error, "StatusCode.INVALID_ARGUMENT", "Unrecognized servable version label: nolabel")

    asyncio.run(asyncio.wait_for(run(), 60))


# -- every datatype -----------------------------------------------------------------------------------

# Each signature's x [2, 2] -> y: not x, x + 1, or x + "!"; extremes of every integer type.
VALUES = {
    "BOOL": np.array([[True, False], [False, True]]),
    "INT8": np.array([[-128, 0], [5, 126]], np.int8),
    "INT16": np.array([[-32768, 0], [5, 32766]], np.int16),
    "INT32": np.array([[-(2**31), 0], [5, 2**31 - 2]], np.int32),
    "INT64": np.array([[-(2**63), 0], [5, 2**63 - 2]], np.int64),
    "UINT8": np.array([[0, 1], [5, 254]], np.uint8),
    "UINT16": np.array([[0, 1], [5, 65534]], np.uint16),
    "UINT32": np.array([[0, 1], [5, 2**32 - 2]], np.uint32),
    "UINT64": np.array([[0, 1], [5, 2**64 - 2]], np.uint64),
    "FP16": np.array([[0.5, -2.0], [1000.0, 0.25]], np.float16),
    "BF16": np.array([[0.5, -2.0], [128.0, 0.25]], ml_dtypes.bfloat16),
    "FP32": np.array([[0.1, -2.5], [3.0e38, 1e-7]], np.float32),
    "FP64": np.array([[0.1, -2.5], [1e300, 1e-7]], np.float64),
    "BYTES": np.array([[b"a", b""], ["\u00e9t\u00e9".encode(), b"x y"]], np.object_),
}


def expected_step(datatype: str, x: np.ndarray) -> np.ndarray:
    if datatype == "BOOL":
        return np.logical_not(x)
    if datatype == "BYTES":
        return np.array([value + b"!" for value in x.ravel()], np.object_).reshape(x.shape)
    return x + x.dtype.type(1)


@pytest.mark.parametrize("transport", ["http_json", "http_binary", "grpc"])
@pytest.mark.parametrize("datatype", sorted(VALUES))
def test_every_datatype(server, http, grpc_client, datatype, transport):
    x = VALUES[datatype]
    expected = expected_step(datatype, x)
    parameters = {"signature_name": datatype.lower()}
    if transport == "grpc":
        result = grpc_client.infer("dtypes", [v2_grpc_input("x", x, datatype)], parameters=parameters)
        [output] = result.get_response().outputs
        assert (output.datatype, list(output.shape)) == (datatype, [2, 2])
    elif datatype == "BF16" and transport == "http_json":
        # tritonclient sends BF16 only as binary; JSON numbers are the protocol's way too.
        body = {"parameters": parameters, "inputs": [{"name": "x", "datatype": "BF16", "shape": [2, 2]}]}
        body["inputs"][0]["data"] = x.astype(np.float32).ravel().tolist()
        r = post(server.rest + "/v2/models/dtypes/infer", body)
        assert r.status_code == 200, r.text
        [output] = r.json()["outputs"]
        assert output == {"name": "y", "datatype": "BF16", "shape": [2, 2], "data": [1.5, -1.0, 129.0, 1.25]}
        return
    else:
        binary = transport == "http_binary"
        result = http.infer(
            "dtypes",
            [v2_http_input("x", x, datatype, binary)],
            outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)],
            parameters=parameters,
        )
        [output] = result.get_response()["outputs"]
        assert (output["datatype"], output["shape"]) == (datatype, [2, 2])
        assert ("data" in output) is not binary
    y = result.as_numpy("y")
    if datatype == "BYTES" and transport == "http_json":  # JSON strings come back as str
        y = np.array([value.encode() for value in y.ravel()], np.object_).reshape(y.shape)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(y, expected)


NOT_UTF8 = np.array([b"\xff\x00ab", b"", b"\xc3", "\u00e9".encode()], np.object_)


def test_bytes_that_are_not_utf8(server, http, grpc_client):
    parameters = {"signature_name": "bytes"}
    expected = np.array([value + b"!" for value in NOT_UTF8], np.object_)
    result = http.infer("dtypes", [v2_http_input("x", NOT_UTF8, "BYTES")], parameters=parameters)
    np.testing.assert_array_equal(result.as_numpy("y"), expected)
    result = grpc_client.infer("dtypes", [v2_grpc_input("x", NOT_UTF8, "BYTES")], parameters=parameters)
    np.testing.assert_array_equal(result.as_numpy("y"), expected)
    # As JSON the output cannot be written: the error says how to ask for it.
    with pytest.raises(InferenceServerException) as error:
        http.infer(
            "dtypes",
            [v2_http_input("x", NOT_UTF8, "BYTES")],
            outputs=[httpclient.InferRequestedOutput("y", binary_data=False)],
            parameters=parameters,
        )
    assert_v2_error(error, "400", "output 'y' holds bytes that are not UTF-8; request it as binary data")


# -- versions, labels, signatures -----------------------------------------------------------------------


@pytest.mark.parametrize("version, served", [("", "2"), ("1", "1"), ("2", "2"), ("stable", "1"), ("canary", "2")])
def test_versions_and_labels(http, grpc_client, version, served):
    result = http.infer("dtypes", http_ab(), model_version=version)
    assert result.get_response()["model_version"] == served
    assert_outputs(result, expected_arithmetic(int(served)))
    result = grpc_client.infer("dtypes", grpc_ab(), model_version=version)
    assert result.get_response().model_version == served
    assert_outputs(result, expected_arithmetic(int(served)))


def test_unknown_version_and_label(http, grpc_client):
    with pytest.raises(InferenceServerException) as error:
        http.infer("dtypes", http_ab(), model_version="9")
    assert_v2_error(error, "404", "Servable not found for request: Specific(dtypes, 9)")
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("dtypes", grpc_ab(), model_version="9")
    assert_v2_error(error, "StatusCode.NOT_FOUND", "Servable not found for request: Specific(dtypes, 9)")
    with pytest.raises(InferenceServerException) as error:
        http.infer("dtypes", http_ab(), model_version="nolabel")
    assert_v2_error(error, "400", "Unrecognized servable version label: nolabel")


SIGNATURES = (
    "bf16, bool, bytes, fp16, fp32, fp64, int16, int32, int64, int8, serving_default, uint16, uint32, uint64, uint8"
)


def test_unknown_signature(http, grpc_client):
    message = (
        f"signature 'nosig' not found; the model has {SIGNATURES} "
        "(choose one with the request parameter 'signature_name')"
    )
    with pytest.raises(InferenceServerException) as error:
        http.infer("dtypes", http_ab(), parameters={"signature_name": "nosig"})
    assert_v2_error(error, "400", message)
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("dtypes", grpc_ab(), parameters={"signature_name": "nosig"})
    assert_v2_error(error, "StatusCode.INVALID_ARGUMENT", message)


# -- every runtime --------------------------------------------------------------------------------------

RUNTIMES = {
    # TF1 SavedModel (Session), TF2 SavedModel, ONNX Runtime, TFLite interpreter.
    "half_plus_two": ({"x": np.array([[1.0], [4.0]], np.float32)}, {"y": np.array([[2.5], [4.0]], np.float32)}),
    "dtypes": ({"a": A, "b": B}, expected_arithmetic()),
    "scaler": (
        {"x": np.array([[1, 2, 3], [4, 5, 6]], np.float32), "k": np.array([7, -1], np.int64)},
        {
            "scaled": np.array([[1, 2, 3], [4, 5, 6]], np.float32),
            "total": np.array([6, 15], np.float32),
            "next": np.array([8, 0], np.int64),
        },
    ),
    "tflite": ({"x": np.array([[1.0], [4.0]], np.float32)}, {"y": np.array([[2.5], [4.0]], np.float32)}),
}
DATATYPE_OF = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_runtime(http, grpc_client, name):
    inputs, expected = RUNTIMES[name]
    result = http.infer(name, [v2_http_input(k, v, DATATYPE_OF[v.dtype], binary=False) for k, v in inputs.items()])
    assert sorted(entry["name"] for entry in result.get_response()["outputs"]) == sorted(expected)
    assert_outputs(result, expected)
    result = grpc_client.infer(name, [v2_grpc_input(k, v, DATATYPE_OF[v.dtype]) for k, v in inputs.items()])
    assert sorted(output.name for output in result.get_response().outputs) == sorted(expected)
    assert_outputs(result, expected)

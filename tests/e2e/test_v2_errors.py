"""The Open Inference Protocol (KServe V2): bad requests and what each answers (400 with the reason, 404,
405), a model whose only version went away, and the model repository extension (index, unload, load) over
tritonclient's HTTP and gRPC clients and raw HTTP.

One server: `dtypes` (tests/models.py's export_v2_types, version 1), `half_plus_two`, `spare` (the
repository tests unload and load it) and `lonely` (a private copy of half_plus_two whose version a test
removes and puts back).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import (
    HALF_PLUS_TWO,
    assert_v2_error,
    assert_v2_rest_error,
    copy_version,
    post,
    statuses,
    v2_grpc_input,
    v2_http_input,
    wait_for,
    write_config,
)
from models import export_v2_types
from tritonclient.utils import InferenceServerException

A = np.array([1.0, 2.5, -4.0], np.float32)
B = np.array([3.0, 0.5, 2.0], np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2errors")
    export_v2_types(root / "dtypes", 1)
    shutil.copytree(HALF_PLUS_TWO, root / "lonely")
    models = [
        {"name": "dtypes", "path": root / "dtypes"},
        {"name": "half_plus_two", "path": HALF_PLUS_TWO},
        {"name": "spare", "path": HALF_PLUS_TWO},
        {"name": "lonely", "path": root / "lonely"},
    ]
    write_config(root / "models.config", *models)
    return root


@pytest.fixture(scope="module")
def server(start_server, repo):
    return start_server(f"--model_config_file={repo / 'models.config'}")


def http_ab() -> list[httpclient.InferInput]:
    return [v2_http_input("a", A, "FP32"), v2_http_input("b", B, "FP32")]


def grpc_ab() -> list[grpcclient.InferInput]:
    return [v2_grpc_input("a", A, "FP32"), v2_grpc_input("b", B, "FP32")]


# -- errors ---------------------------------------------------------------------------------------------


def _json_ab(a: dict | None = None, b: dict | None = None) -> dict:
    first = {"name": "a", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **(a or {})}
    second = {"name": "b", "datatype": "FP32", "shape": [2], "data": [3.0, 4.0], **(b or {})}
    return {"inputs": [first, second]}


def _raw(header: dict, raw: bytes, length_delta: int = 0) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head) + length_delta)}


TWO_FLOATS = np.array([1.0, 2.0], np.float32).tobytes()
RAW_HEADER = _json_ab({"parameters": {"binary_data_size": 8}}, {"parameters": {"binary_data_size": 8}})
for _entry in RAW_HEADER["inputs"]:
    del _entry["data"]

BAD_REQUESTS = {
    "wrong datatype": (_json_ab({"datatype": "FP64"}), "input 'a' has datatype FP64; the model expects FP32"),
    "unknown datatype": (_json_ab({"datatype": "FLOAT"}), "invalid datatype 'FLOAT' for input 'a'"),
    "fewer elements than the shape": (
        _json_ab({"shape": [3]}),
        "input 'a' has 2 elements in its data; its shape [3] takes 3",
    ),
    "more elements than the shape": (
        _json_ab({"shape": [1]}),
        "input 'a' has 2 elements in its data; its shape [1] takes 1",
    ),
    "negative dimension": (
        _json_ab({"shape": [-1]}),
        "input 'a' has an invalid shape [-1]: dimensions are integers >= 0",
    ),
    "shape not an array": (_json_ab({"shape": 2}), "'shape' must be an array"),
    # TF's message, whose second line names the graph's function (a name that differs from export to export).
    "shapes the graph cannot add": (
        _json_ab(b={"shape": [3], "data": [1.0, 2.0, 3.0]}),
        "Incompatible shapes: [2] vs. [3]",
    ),
    "strings for FP32": (_json_ab({"data": ["1", "2"]}), "input 'a' of datatype FP32 takes numbers"),
    "unknown input": (
        _json_ab(b={"name": "c"}),
        "input tensor alias not found in signature: c. Inputs expected to be in the set {a,b}.",
    ),
    "missing input": (
        {"inputs": _json_ab()["inputs"][:1]},
        "input size does not match signature: 1!=2 len({a}) != len({a,b}). Sent extra: {}. Missing but required: {b}.",
    ),
    "input twice": ({"inputs": _json_ab()["inputs"] * 2}, "input 'a' appears more than once"),
    "no inputs field": ({"id": "x"}, "missing 'inputs'"),
    "unknown output": (
        {**_json_ab(), "outputs": [{"name": "nope"}]},
        "output tensor alias not found in signature: nope Outputs expected to be in the set {diff,scaled,sum}.",
    ),
    "malformed JSON": (
        b'{"inputs": [',
        "failed to parse the request JSON: unexpected end of data: line 1 column 13 (char 12)",
    ),
    "JSON not an object": (b"[1, 2]", "the request JSON must be an object"),
    "binary_data_size beyond the body": (
        _raw(RAW_HEADER, TWO_FLOATS + TWO_FLOATS[:4]),
        "input 'b': binary_data_size 8 is beyond the binary data",
    ),
    "binary data after the inputs": (
        _raw(RAW_HEADER, TWO_FLOATS * 3),
        "8 bytes of binary data after the inputs' binary_data_size",
    ),
    "raw size not the shape's": (
        _raw({"inputs": [dict(RAW_HEADER["inputs"][0], shape=[3]), RAW_HEADER["inputs"][1]]}, TWO_FLOATS * 2),
        "input 'a' has 8 bytes of raw data; shape [3] of FP32 takes 12",
    ),
}
_HEAD_LENGTH = len(json.dumps(RAW_HEADER).encode())
BAD_REQUESTS["Inference-Header-Content-Length beyond the body"] = (
    _raw(RAW_HEADER, TWO_FLOATS * 2, 100),
    f"Inference-Header-Content-Length '{_HEAD_LENGTH + 100}' is not a length within the {_HEAD_LENGTH + 16}-byte body",
)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_400_with_a_message(server, case):
    body, message = BAD_REQUESTS[case]
    headers = {}
    if isinstance(body, tuple):
        body, headers = body
    r = post(server.rest + "/v2/models/dtypes/infer", body, headers=headers)
    if case == "shapes the graph cannot add":
        assert (r.status_code, r.json()["error"].split("\n")[0]) == (400, message)
        return
    assert_v2_rest_error(r, 400, message)


def test_client_errors_carry_the_servers_message(http, grpc_client):
    cases = [
        ("FP64", None, "input 'a' has datatype FP64; the model expects FP32"),
        ("FP32", "c", "input tensor alias not found in signature: c. Inputs expected to be in the set {a,b}."),
    ]
    for datatype, name, message in cases:
        a = A.astype(np.float64) if datatype == "FP64" else A
        with pytest.raises(InferenceServerException) as error:
            http.infer("dtypes", [v2_http_input("a", a, datatype), v2_http_input(name or "b", B, "FP32")])
        assert_v2_error(error, "400", message)
        with pytest.raises(InferenceServerException) as error:
            grpc_client.infer("dtypes", [v2_grpc_input("a", a, datatype), v2_grpc_input(name or "b", B, "FP32")])
        assert_v2_error(error, "StatusCode.INVALID_ARGUMENT", message)
    missing = (
        "input size does not match signature: 1!=2 len({a}) != len({a,b}). Sent extra: {}. Missing but required: {b}."
    )
    with pytest.raises(InferenceServerException) as error:
        http.infer("dtypes", [v2_http_input("a", A, "FP32")])
    assert_v2_error(error, "400", missing)
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("dtypes", [v2_grpc_input("a", A, "FP32")])
    assert_v2_error(error, "StatusCode.INVALID_ARGUMENT", missing)
    # Raw data of another size than the shape takes (the clients check shapes, not sizes).
    inputs = grpc_ab()
    inputs[0].set_shape([4])
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("dtypes", inputs)
    assert_v2_error(
        error, "StatusCode.INVALID_ARGUMENT", "input 'a' has 12 bytes of raw data; shape [4] of FP32 takes 16"
    )
    inputs = http_ab()
    inputs[1].set_shape([2])
    with pytest.raises(InferenceServerException) as error:
        http.infer("dtypes", inputs)
    assert_v2_error(error, "400", "input 'b' has 12 bytes of raw data; shape [2] of FP32 takes 8")
    with pytest.raises(InferenceServerException) as error:
        http.infer("nope", http_ab())
    assert_v2_error(error, "404", "Servable not found for request: Latest(nope)")
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("nope", grpc_ab())
    assert_v2_error(error, "StatusCode.NOT_FOUND", "Servable not found for request: Latest(nope)")


@pytest.mark.parametrize(
    "method, path, status, message",
    [
        ("GET", "/v2/nothing", 404, "no Open Inference Protocol route for /v2/nothing"),
        (
            "POST",
            "/v2/models/dtypes/versions/1/explain",
            404,
            "no Open Inference Protocol route for /v2/models/dtypes/versions/1/explain",
        ),
        ("GET", "/v2/models/dtypes/infer", 405, "GET is not allowed on /v2/models/dtypes/infer"),
        ("POST", "/v2/health/live", 405, "POST is not allowed on /v2/health/live"),
        ("DELETE", "/v2/models/dtypes", 405, "DELETE is not allowed on /v2/models/dtypes"),
        ("GET", "/v2/repository/index", 405, "GET is not allowed on /v2/repository/index"),
        ("POST", "/v2/models/nope/infer", 404, "Servable not found for request: Latest(nope)"),
        (
            "POST",
            "/v2/repository/models/nope/load",
            404,
            "Model nope is neither in the model config nor was unloaded from it",
        ),
        ("POST", "/v2/repository/models/nope/unload", 404, "Model nope is not in the model config"),
    ],
)
def test_unknown_routes_and_methods(server, method, path, status, message):
    r = requests.request(method, server.rest + path, data=json.dumps(_json_ab()), timeout=10)
    assert_v2_rest_error(r, status, message)


def test_model_whose_only_version_went_away(server, repo, http, grpc_client):
    """`lonely`'s version folder is removed: the model stays configured with no version to serve."""
    version = repo / "lonely" / "00000123"
    shutil.rmtree(version)
    try:
        wait_for(lambda: statuses(server, "lonely") == [(123, "END", "OK")], 30, "lonely unloaded")
        r = requests.get(server.rest + "/v2/models/lonely/ready", timeout=10)
        assert (r.status_code, r.json()) == (400, {"name": "lonely", "ready": False})
        assert http.is_model_ready("lonely") is False
        assert grpc_client.is_model_ready("lonely") is False
        # No version left to serve: TF Serving's NOT_FOUND, on every API alike.
        message = "Servable not found for request: Latest(lonely)"
        r = post(
            server.rest + "/v2/models/lonely/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]},
        )
        assert_v2_rest_error(r, 404, message)
        with pytest.raises(InferenceServerException) as error:
            grpc_client.infer("lonely", [v2_grpc_input("x", np.array([[1.0]], np.float32), "FP32")])
        assert_v2_error(error, "StatusCode.NOT_FOUND", message)
        assert post(server.rest + "/v1/models/lonely:predict", {"instances": [1.0]}).json() == {"error": message}
        # The server is not ready while a configured model has no version.
        assert http.is_server_ready() is False
        r = requests.get(server.rest + "/v2/health/ready", timeout=10)
        assert (r.status_code, r.json()) == (400, {"ready": False})
        index = {(m["name"], m["version"]): (m["state"], m["reason"]) for m in http.get_model_repository_index()}
        assert index[("lonely", "123")] == ("UNAVAILABLE", "")
    finally:
        copy_version(HALF_PLUS_TWO / "00000123", repo / "lonely", 123)
    wait_for(lambda: http.is_model_ready("lonely"), 30, "lonely back")
    assert http.is_server_ready() is True


# -- the model repository extension ----------------------------------------------------------------------


def _index(client) -> dict[tuple[str, str], str]:
    """name, version -> state, from either client's repository index."""
    index = client.get_model_repository_index()
    if isinstance(index, list):  # HTTP: the JSON document
        return {(m["name"], m["version"]): m["state"] for m in index}
    return {(m.name, m.version): m.state for m in index.models}


def _predict_spare(server) -> requests.Response:
    return post(server.rest + "/v1/models/spare:predict", {"instances": [[1.0]]})


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_repository_index_unload_and_load(server, http, grpc_client, protocol):
    client = http if protocol == "http" else grpc_client
    x = np.array([[1.0], [4.0]], np.float32)
    ready = {
        ("dtypes", "1"): "READY",
        ("half_plus_two", "123"): "READY",
        ("lonely", "123"): "READY",
        ("spare", "123"): "READY",
    }
    assert _index(client) == ready
    client.unload_model("spare")
    wait_for(lambda: _index(client)[("spare", "123")] == "UNAVAILABLE", 30, "spare unloaded")
    assert _index(client) == {**ready, ("spare", "123"): "UNAVAILABLE"}
    assert http.is_model_ready("spare") is False
    assert grpc_client.is_model_ready("spare") is False
    r = requests.post(server.rest + "/v2/repository/index", data=b'{"ready": true}', timeout=10)
    assert sorted((m["name"], m["version"]) for m in r.json()) == sorted(set(ready) - {("spare", "123")})
    # The TF API and V2 no longer serve it.
    assert (_predict_spare(server).status_code, _predict_spare(server).json()) == (
        404,
        {"error": "Servable not found for request: Latest(spare)"},
    )
    with pytest.raises(InferenceServerException) as error:
        http.infer("spare", [v2_http_input("x", x, "FP32")])
    assert_v2_error(error, "404", "Servable not found for request: Latest(spare)")
    client.unload_model("spare")  # unloading an unloaded model is fine
    client.load_model("spare")
    assert http.is_model_ready("spare") is True
    assert grpc_client.is_model_ready("spare") is True
    assert _index(client) == ready
    assert _predict_spare(server).json() == {"predictions": [[2.5]]}
    result = grpc_client.infer("spare", [v2_grpc_input("x", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("y"), np.array([[2.5], [4.0]], np.float32))
    client.load_model("spare")  # loading a served model is fine


def test_repository_errors(http, grpc_client):
    with pytest.raises(InferenceServerException) as error:
        http.load_model("nope")
    assert_v2_error(error, "404", "Model nope is neither in the model config nor was unloaded from it")
    with pytest.raises(InferenceServerException) as error:
        grpc_client.load_model("nope")
    assert_v2_error(error, "StatusCode.NOT_FOUND", "Model nope is neither in the model config nor was unloaded from it")
    with pytest.raises(InferenceServerException) as error:
        grpc_client.unload_model("nope")
    assert_v2_error(error, "StatusCode.NOT_FOUND", "Model nope is not in the model config")

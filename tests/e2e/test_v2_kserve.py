"""The Open Inference Protocol (V2) as the kserve package's clients see it: InferenceRESTClient with
RESTConfig(protocol="v2") and InferenceGRPCClient (kserve 0.21.0, unmodified) against the real server.

kserve needs protobuf<7 and pyserving pins 7, so the clients live in .venvs/kserve-client (made by
`bin/install --test`) and run in tests/e2e/kserve_client.py, a subprocess that answers one JSON document.
All the calls run in one subprocess per module (kserve takes seconds to import); each test checks its own.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from helpers import HALF_PLUS_TWO, write_config
from models import export_kitchen

ROOT = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = ROOT / ".venvs" / "kserve-client" / "bin" / "python"
SCRIPT = Path(__file__).with_name("kserve_client.py")

if not KSERVE_PYTHON.exists():
    pytest.skip(
        f"{KSERVE_PYTHON.parent.parent} does not exist: run `bin/install --test` to create the kserve client's "
        "virtualenv (kserve 0.21.0 needs protobuf<7, so it cannot live in .venv)",
        allow_module_level=True,
    )

X = {"name": "x", "datatype": "FP32", "shape": [3, 1], "data": [1.0, 2.0, 5.0]}
Y = {"dtype": "float32", "shape": [3, 1], "data": [[2.5], [3.0], [4.5]]}
TEXT = {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["héllo", "ab"]}
COUNT = {"name": "count", "datatype": "INT64", "shape": [2], "data": [2**40, -3]}
FLAG = {"name": "flag", "datatype": "BOOL", "shape": [2], "data": [True, False]}
TYPES_OUTPUTS = ["count", "flag", "text", "length"]
VIAS = ("rest", "grpc")


def _types_call(via: str, mode: str, **extra) -> dict:
    return {
        "op": "infer",
        "via": via,
        "model": "kitchen",
        "parameters": {"signature_name": "types"},
        "inputs": [{**tensor, "mode": mode} for tensor in (TEXT, COUNT, FLAG)],
        "outputs": [{"name": name} for name in TYPES_OUTPUTS],
        **extra,
    }


def _calls() -> dict[str, dict]:
    calls: dict[str, dict] = {}
    for via in VIAS:
        calls |= {
            f"{via} live": {"op": "server_live", "via": via},
            f"{via} ready": {"op": "server_ready", "via": via},
            f"{via} model ready": {"op": "model_ready", "via": via},
            f"{via} kitchen ready": {"op": "model_ready", "via": via, "model": "kitchen"},
            f"{via} metadata": {"op": "model_metadata", "via": via},
            f"{via} metadata version": {"op": "model_metadata", "via": via, "version": "123"},
            f"{via} kitchen metadata": {"op": "model_metadata", "via": via, "model": "kitchen"},
            f"{via} infer numpy": {"op": "infer", "via": via, "inputs": [X], "id": "req-1"},
            f"{via} infer json": {"op": "infer", "via": via, "inputs": [{**X, "mode": "json"}]},
            f"{via} infer binary": {"op": "infer", "via": via, "inputs": [{**X, "mode": "binary"}]},
            f"{via} types json": _types_call(via, "json"),
            f"{via} types numpy": _types_call(via, "numpy"),
            f"{via} types binary": _types_call(via, "binary"),
            f"{via} two outputs": {
                "op": "infer",
                "via": via,
                "model": "kitchen",
                "inputs": [
                    {"name": "a", "datatype": "FP32", "shape": [2], "data": [1.0, 3.0]},
                    {"name": "b", "datatype": "FP32", "shape": [2], "data": [2.0, 4.0]},
                ],
                "outputs": [{"name": "product"}],
            },
            f"{via} unknown model": {"op": "infer", "via": via, "model": "nope", "inputs": [X]},
            f"{via} unknown model ready": {"op": "model_ready", "via": via, "model": "nope"},
            f"{via} wrong datatype": {"op": "infer", "via": via, "inputs": [{**X, "datatype": "FP64"}]},
            f"{via} unknown signature": {
                "op": "infer",
                "via": via,
                "inputs": [X],
                "parameters": {"signature_name": "nope"},
            },
        }
    calls |= {
        # REST: binary outputs, per output (binary_data) and for all (binary_data_output).
        "rest types binary outputs": _types_call(
            "rest",
            "binary",
            outputs=[{"name": name, "parameters": {"binary_data": True}} for name in TYPES_OUTPUTS],
        ),
        "rest binary_data_output": {
            "op": "infer",
            "via": "rest",
            "inputs": [X],
            "parameters": {"binary_data_output": True},
        },
        # gRPC: model_version (the REST client has no version in its infer URL), bytes that are not UTF-8.
        "grpc version": {"op": "infer", "via": "grpc", "version": "123", "inputs": [X]},
        "grpc unknown version": {"op": "infer", "via": "grpc", "version": "7", "inputs": [X]},
        "grpc raw bytes": {
            **_types_call("grpc", "binary"),
            "inputs": [
                {**TEXT, "data": [{"b64": base64.b64encode(b"\x00\xffraw").decode()}, "ab"], "mode": "binary"},
                {**COUNT, "mode": "binary"},
                {**FLAG, "mode": "binary"},
            ],
            "outputs": [{"name": "text_bytes"}, {"name": "length"}],
        },
    }
    return calls


@pytest.fixture(scope="module")
def results(start_server, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("v2_kserve")
    config = write_config(
        work / "models.config",
        {"name": "half_plus_two", "path": HALF_PLUS_TWO},
        {"name": "kitchen", "path": export_kitchen(work / "kitchen")},
    )
    server = start_server(f"--model_config_file={config}")
    calls = _calls()
    job = {"rest": server.rest, "grpc": server.grpc, "model": "half_plus_two", "timeout": 30}
    job["calls"] = list(calls.values())
    done = subprocess.run(
        [str(KSERVE_PYTHON), str(SCRIPT)], input=json.dumps(job), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)["results"]
    assert len(answers) == len(calls)
    return dict(zip(calls, answers, strict=True))


def _value(results: dict[str, dict], key: str):
    result = results[key]
    assert result["ok"], f"{key}: {result['error']}"
    return result["value"]


def _error(results: dict[str, dict], key: str) -> dict:
    result = results[key]
    assert not result["ok"], f"{key} succeeded: {result['value']}"
    return result["error"]


def _arrays(response: dict) -> dict[str, dict]:
    return {output["name"]: output["array"] for output in response["outputs"]}


@pytest.mark.parametrize("via", VIAS)
def test_health(results, via):
    assert _value(results, f"{via} live") is True
    assert _value(results, f"{via} ready") is True
    assert _value(results, f"{via} model ready") is True
    assert _value(results, f"{via} kitchen ready") is True


@pytest.mark.parametrize("via", VIAS)
def test_model_metadata(results, via):
    """The clients have no metadata call: REST through httpx, gRPC through kserve's generated stub."""
    half_plus_two = {
        "name": "half_plus_two",
        "versions": ["123"],
        "platform": "tensorflow",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
    }
    assert _value(results, f"{via} metadata")["metadata"] == half_plus_two
    assert _value(results, f"{via} metadata version")["metadata"] == half_plus_two
    assert _value(results, f"{via} kitchen metadata")["metadata"] == {
        "name": "kitchen",
        "versions": ["1"],
        "platform": "tensorflow",
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1]}, {"name": "b", "datatype": "FP32", "shape": [-1]}],
        "outputs": [
            {"name": "product", "datatype": "FP32", "shape": [-1]},
            {"name": "sum", "datatype": "FP32", "shape": [-1]},
        ],
    }


def test_rest_infer(results):
    """The REST client sends JSON (numpy and json modes) or the binary extension (binary mode); the answer is
    JSON. It keeps the response's id (it sends a uuid when the request has none) but not model_version."""
    response = _value(results, "rest infer numpy")
    assert response == {
        "model_name": "half_plus_two",
        "model_version": None,
        "id": "req-1",
        "parameters": None,
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [3, 1], "parameters": None, "array": Y}],
    }
    for mode in ("json", "binary"):
        response = _value(results, f"rest infer {mode}")
        assert _arrays(response) == {"y": Y}, mode
        assert response["outputs"][0]["parameters"] is None, mode  # JSON data, not binary


def test_grpc_infer(results):
    """Typed contents (json mode) or raw_input_contents (numpy, binary); raw outputs either way."""
    response = _value(results, "grpc infer numpy")
    assert response == {
        "model_name": "half_plus_two",
        "model_version": "123",
        "id": "req-1",
        "parameters": {},
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [3, 1], "parameters": {}, "array": Y}],
    }
    for mode in ("json", "binary"):
        assert _arrays(_value(results, f"grpc infer {mode}")) == {"y": Y}, mode


@pytest.mark.parametrize("mode", ["json", "numpy", "binary"])
@pytest.mark.parametrize("via", VIAS)
def test_bytes_int64_bool_with_signature_name(results, via, mode):
    response = _value(results, f"{via} types {mode}")
    assert response["model_name"] == "kitchen"
    assert [(o["name"], o["datatype"], o["shape"]) for o in response["outputs"]] == [
        ("count", "INT64", [2]),
        ("flag", "BOOL", [2]),
        ("text", "BYTES", [2]),
        ("length", "INT32", [2]),
    ]
    # REST answers BYTES as JSON strings, which the client keeps as str; gRPC's raw outputs give bytes.
    text = ["héllo", "ab"] if via == "rest" else [{"b64": base64.b64encode(s.encode()).decode()} for s in TEXT["data"]]
    assert _arrays(response) == {
        "count": {"dtype": "int64", "shape": [2], "data": [2**41, -6]},
        "flag": {"dtype": "bool", "shape": [2], "data": [False, True]},
        "text": {"dtype": "object", "shape": [2], "data": text},
        "length": {"dtype": "int32", "shape": [2], "data": [6, 2]},
    }


@pytest.mark.parametrize("via", VIAS)
def test_explicit_outputs(results, via):
    response = _value(results, f"{via} two outputs")
    assert _arrays(response) == {"product": {"dtype": "float32", "shape": [2], "data": [2.0, 12.0]}}


def test_rest_binary_outputs(results):
    """Binary outputs (inference-header-content-length) as the REST client parses them: back to str for BYTES."""
    response = _value(results, "rest types binary outputs")
    assert _arrays(response) == {
        "count": {"dtype": "int64", "shape": [2], "data": [2**41, -6]},
        "flag": {"dtype": "bool", "shape": [2], "data": [False, True]},
        "text": {"dtype": "object", "shape": [2], "data": ["héllo", "ab"]},
        "length": {"dtype": "int32", "shape": [2], "data": [6, 2]},
    }
    sizes = {o["name"]: o["parameters"] for o in response["outputs"]}
    assert sizes == {"count": {}, "flag": {}, "text": {}, "length": {}}  # the client drops binary_data_size
    response = _value(results, "rest binary_data_output")
    assert _arrays(response) == {"y": Y}


def test_grpc_model_version(results):
    assert _arrays(_value(results, "grpc version")) == {"y": Y}
    assert _value(results, "grpc version")["model_version"] == "123"
    error = _error(results, "grpc unknown version")
    assert error["status"] == "NOT_FOUND", error


def test_grpc_bytes_that_are_not_utf8(results):
    response = _value(results, "grpc raw bytes")
    assert _arrays(response) == {
        "text_bytes": {"dtype": "object", "shape": [2], "data": [{"b64": "AP9yYXc="}, {"b64": "YWI="}]},
        "length": {"dtype": "int32", "shape": [2], "data": [5, 2]},
    }


def test_unknown_model(results):
    error = _error(results, "rest unknown model")
    assert error["class"] == "httpx.HTTPStatusError"
    assert error["status"] == 404
    assert error["content_type"] == "application/json"  # exactly: else the client leaves the message out
    assert error["message"].startswith("Servable not found for request: Latest(nope), '404 Not Found' for url ")
    error = _error(results, "grpc unknown model")
    assert error["class"] == "grpc.aio._call.AioRpcError"
    assert (error["status"], error["details"]) == ("NOT_FOUND", "Servable not found for request: Latest(nope)")
    # The REST client's is_model_ready answers False for any non-2xx; the gRPC one raises.
    assert _value(results, "rest unknown model ready") is False
    error = _error(results, "grpc unknown model ready")
    assert (error["status"], error["details"]) == ("NOT_FOUND", "Model nope is not served")


def test_wrong_datatype(results):
    message = "input 'x' has datatype FP64; the model expects FP32"
    error = _error(results, "rest wrong datatype")
    assert error["status"] == 400
    assert error["message"].startswith(f"{message}, '400 Bad Request' for url ")
    error = _error(results, "grpc wrong datatype")
    assert (error["status"], error["details"]) == ("INVALID_ARGUMENT", message)


@pytest.mark.parametrize("via", VIAS)
def test_unknown_signature(results, via):
    error = _error(results, f"{via} unknown signature")
    assert error["status"] == (400 if via == "rest" else "INVALID_ARGUMENT"), error
    assert "signature 'nope' not found" in error["message"]

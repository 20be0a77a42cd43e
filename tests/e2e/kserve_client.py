"""Runs the kserve package's inference clients (kserve 0.21.0, unmodified) for tests/e2e/test_v2_kserve.py.

Run by .venvs/kserve-client's python (kserve needs protobuf<7, pyserving's .venv has 7), never imported by
the tests. The job is a JSON document, as the first argument or on stdin:

    {"rest": "http://127.0.0.1:8501", "grpc": "127.0.0.1:8500", "model": "m", "version": "",
     "timeout": 30, "calls": [CALL, ...]}

A CALL is {"op": OP, "via": "rest" | "grpc", ...}; "model" and "version" default to the job's. OPs:

- "server_live", "server_ready", "model_ready": the clients' is_server_live/is_server_ready/is_model_ready.
- "infer": InferenceRESTClient.infer / InferenceGRPCClient.infer of an InferRequest with "inputs"
  ([{"name", "datatype", "shape", "data", "mode"}]), optional "outputs" ([{"name", "parameters"}]),
  "parameters" (the request's) and "id". "data" is a flat list; a BYTES element is a string or
  {"b64": ...} for bytes. "mode" says how the InferInput gets its data: "numpy" (data=an ndarray: JSON over
  REST, raw_input_contents over gRPC), "json" (set_data_from_numpy(binary_data=False): JSON over REST, typed
  contents over gRPC), "binary" (set_data_from_numpy(binary_data=True): the binary tensor data extension over
  REST, raw_input_contents over gRPC).
- "model_metadata": the clients have no metadata call, so this uses what the kserve package ships for it:
  over gRPC its generated GRPCInferenceServiceStub.ModelMetadata, over REST a GET with httpx (kserve's HTTP
  client library); the answer says which ("client").

Prints one JSON document, {"results": [RESULT, ...]} in the calls' order. A RESULT is {"ok": true,
"value": ...} or {"ok": false, "error": {"class", "message", "status", ...}}: for an httpx.HTTPStatusError the
HTTP status (and the body and content type), for a grpc.RpcError the status code's name (and details). An
infer's value is the InferResponse: model_name, model_version, id, parameters and outputs, each with name,
datatype, shape, parameters and "array" (as_numpy(): dtype, shape and data as a nested list; a bytes element
as {"b64": ...}, a str element as the string).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import grpc
import httpx
import numpy as np
from google.protobuf import json_format
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from kserve.protocol.infer_type import RequestedOutput

_DTYPES = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def _element_in(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    return value


def _element_out(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_element_out(v) for v in value]
    return value


def _array_out(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": _element_out(array.tolist())}


def _infer_input(spec: dict[str, Any]) -> InferInput:
    datatype, shape = spec["datatype"], spec["shape"]
    values = [_element_in(v) for v in spec["data"]]
    array = np.array(values, dtype=_DTYPES[datatype]).reshape(shape)
    mode = spec.get("mode", "numpy")
    if mode == "numpy":
        return InferInput(spec["name"], shape, datatype, data=array)
    infer_input = InferInput(spec["name"], shape, datatype)
    if mode not in ("json", "binary"):
        raise ValueError(f"unknown input mode {mode!r}")
    infer_input.set_data_from_numpy(array, binary_data=mode == "binary")
    return infer_input


def _infer_request(call: dict[str, Any]) -> InferRequest:
    outputs = [RequestedOutput(o["name"], o.get("parameters")) for o in call.get("outputs", [])]
    return InferRequest(
        model_name=call["model"],
        infer_inputs=[_infer_input(spec) for spec in call["inputs"]],
        request_id=call.get("id"),
        parameters=call.get("parameters"),
        request_outputs=outputs or None,
        model_version=call.get("version") or None,
    )


def _parameters_out(parameters: Any) -> Any:
    """REST parameters are a dict already; gRPC ones a map of InferParameter messages."""
    if parameters is None:
        return None
    out = {}
    for key, value in parameters.items():
        out[key] = json_format.MessageToDict(value) if isinstance(value, grpc_predict_v2_pb2.InferParameter) else value
    return out


def _response_out(response: Any) -> dict[str, Any]:
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "parameters": _parameters_out(response.parameters),
        "outputs": [
            {
                "name": output.name,
                "datatype": output.datatype,
                "shape": list(output.shape),
                "parameters": _parameters_out(output.parameters),
                "array": _array_out(output.as_numpy()),
            }
            for output in response.outputs
        ],
    }


def _error_out(exc: BaseException) -> dict[str, Any]:
    error: dict[str, Any] = {
        "class": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "status": None,
    }
    if isinstance(exc, httpx.HTTPStatusError):
        error["status"] = exc.response.status_code
        error["content_type"] = exc.response.headers.get("content-type")
        error["body"] = exc.response.text
    elif isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        error["status"] = exc.code().name
        error["details"] = exc.details()
    return error


class _Runner:
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.timeout = job.get("timeout", 30)
        self.rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=self.timeout))
        self.grpc = InferenceGRPCClient(job["grpc"], timeout=self.timeout)

    async def close(self) -> None:
        await self.rest.close()
        await self.grpc.close()

    async def run(self, call: dict[str, Any]) -> Any:
        call = {"model": self.job.get("model"), "version": self.job.get("version", ""), **call}
        op, via, base = call["op"], call["via"], self.job["rest"]
        if via not in ("rest", "grpc"):
            raise ValueError(f"unknown via {via!r}")
        if op == "server_live":
            return await (self.rest.is_server_live(base) if via == "rest" else self.grpc.is_server_live())
        if op == "server_ready":
            return await (self.rest.is_server_ready(base) if via == "rest" else self.grpc.is_server_ready())
        if op == "model_ready":
            if via == "rest":
                return await self.rest.is_model_ready(base, call["model"])
            return await self.grpc.is_model_ready(call["model"])
        if op == "infer":
            request = _infer_request(call)
            if via == "rest":
                return _response_out(await self.rest.infer(base, request, model_name=call["model"]))
            return _response_out(await self.grpc.infer(request))
        if op == "model_metadata":
            return await self._model_metadata(via, call["model"], call["version"])
        raise ValueError(f"unknown op {op!r}")

    async def _model_metadata(self, via: str, model: str, version: str) -> dict[str, Any]:
        if via == "rest":
            path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(self.job["rest"] + path)
            response.raise_for_status()
            return {"client": "httpx GET", "metadata": response.json()}
        async with grpc.aio.insecure_channel(self.job["grpc"]) as channel:
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = grpc_predict_v2_pb2.ModelMetadataRequest(name=model, version=version)
            response = await stub.ModelMetadata(request, timeout=self.timeout)
        return {
            "client": "kserve GRPCInferenceServiceStub",
            "metadata": {
                "name": response.name,
                "versions": list(response.versions),
                "platform": response.platform,
                "inputs": [_tensor_metadata(t) for t in response.inputs],
                "outputs": [_tensor_metadata(t) for t in response.outputs],
            },
        }


def _tensor_metadata(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


async def _main(job: dict[str, Any]) -> dict[str, Any]:
    runner = _Runner(job)
    results = []
    try:
        for call in job["calls"]:
            try:
                results.append({"ok": True, "value": await runner.run(call)})
            except Exception as exc:  # the error cases are results too
                results.append({"ok": False, "error": _error_out(exc)})
    finally:
        await runner.close()
    return {"results": results}


if __name__ == "__main__":
    job = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    out, sys.stdout = sys.stdout, sys.stderr  # stdout is the result's alone, whatever a library prints
    document = asyncio.run(_main(job))
    out.write(json.dumps(document) + "\n")

"""Open Inference Protocol REST bodies: infer requests parsed (JSON, or a JSON header and raw tensors) and
answers written. `decode_infer` and `check_infer` do a whole big body in one call, so that a codec process
(`workers.codecs`) can run it; `rest` does the same step by step, in its own process, for a small one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving.errors import invalid_argument
from pyserving.protocols.v2 import datatypes
from pyserving.protocols.v2.inference import InputTensor, decode_inputs, infer_signature, model_spec
from pyserving.serving import PredictResult

__all__ = [
    "CHECK_INFER",
    "DECODE_INFER",
    "ENCODE_INFER",
    "InferRequest",
    "check_infer",
    "decode_infer",
    "described",
    "encode_infer",
    "json_object",
    "parse_infer",
]

# The functions as `CodecProcesses.run` names them.
DECODE_INFER = f"{__name__}:decode_infer"
CHECK_INFER = f"{__name__}:check_infer"
ENCODE_INFER = f"{__name__}:encode_infer"


@dataclass(slots=True)
class InferRequest:
    id: str
    parameters: dict[str, Any]
    inputs: list[InputTensor]
    outputs: list[str]
    binary_outputs: set[str]


def parse_infer(body: bytes | memoryview, header_length: bytes | None) -> InferRequest:
    """An infer body: JSON, or a JSON header and the inputs' raw bytes after it."""
    raw = memoryview(body)[:0]
    head: bytes | memoryview = body
    if header_length is not None:
        if not header_length.isdigit() or len(header_length) > 19 or int(header_length) > len(body):
            raise invalid_argument(
                f"Inference-Header-Content-Length {header_length.decode('latin-1')!r} is not a length "
                f"within the {len(body)}-byte body"
            )
        head, raw = memoryview(body)[: int(header_length)], memoryview(body)[int(header_length) :]
    doc = json_object(head)
    parameters = _field(doc, "parameters", dict, {})
    request_id = _field(doc, "id", str, "")
    inputs, offset = [], 0
    for entry in _field(doc, "inputs", list, None):
        if not isinstance(entry, dict):
            raise invalid_argument("each of 'inputs' must be an object")
        name = _field(entry, "name", str, None)
        datatype = _field(entry, "datatype", str, None)
        shape = _field(entry, "shape", list, None)
        size = _field(entry, "parameters", dict, {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(raw):
                raise invalid_argument(f"input '{name}': binary_data_size {size} is beyond the binary data")
            inputs.append(InputTensor(name, datatype, shape, raw[offset : offset + size], "raw"))
            offset += size
        elif "data" in entry:
            inputs.append(InputTensor(name, datatype, shape, entry["data"], "json"))
        else:
            raise invalid_argument(f"input '{name}' has neither 'data' nor the binary_data_size parameter")
    if offset != len(raw):
        raise invalid_argument(f"{len(raw) - offset} bytes of binary data after the inputs' binary_data_size")
    binary_default = parameters.get("binary_data_output", False) is True
    outputs, binary_outputs = [], set()
    for entry in _field(doc, "outputs", list, []):
        if not isinstance(entry, dict):
            raise invalid_argument("each of 'outputs' must be an object")
        name = _field(entry, "name", str, None)
        outputs.append(name)
        if _field(entry, "parameters", dict, {}).get("binary_data", binary_default) is True:
            binary_outputs.add(name)
    if not outputs and binary_default:
        binary_outputs = {"*"}
    return InferRequest(request_id, parameters, inputs, outputs, binary_outputs)


def encode_infer(result: PredictResult, request: InferRequest) -> tuple[bytes, int | None]:
    """(body, JSON header length when raw outputs follow it)."""
    every = "*" in request.binary_outputs
    described, raws = [], []
    for name, array in result.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatypes.datatype_of(array), "shape": list(array.shape)}
        if every or name in request.binary_outputs:
            raw = datatypes.to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            entry["data"] = datatypes.to_json(name, array)
        described.append(entry)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
    if request.id:
        doc["id"] = request.id
    doc["outputs"] = described
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raws:
        return head, None
    return b"".join([head, *raws]), len(head)


def json_object(data: bytes | memoryview) -> dict[str, Any]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid_argument(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid_argument("the request JSON must be an object")
    return doc


def _field(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = doc.get(key, default)
    if value is None:
        raise invalid_argument(f"missing '{key}'")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = _KINDS[kind]
        raise invalid_argument(f"'{key}' must be {'an' if what[0] in 'aeiou' else 'a'} {what}")
    return value


_KINDS = {dict: "object", list: "array", str: "string", int: "integer"}


def check_infer(body: bytes | memoryview, header_length: bytes | None, name: str, version: str) -> None:
    """The errors an infer body gets before its model is looked up (the body is parsed first)."""
    model_spec(name, version, parse_infer(body, header_length).parameters)


def decode_infer(
    body: bytes | memoryview,
    header_length: bytes | None,
    name: str,
    version: str,
    signatures: Mapping[str, meta_graph_pb2.SignatureDef],
    max_bytes: int,
) -> tuple[InferRequest, str, dict[str, np.ndarray]]:
    """(the request without its inputs, signature key, input arrays) of an infer body, against the signatures
    of the version it targets."""
    request = parse_infer(body, header_length)
    key, signature = infer_signature(signatures, model_spec(name, version, request.parameters).signature_name)
    arrays = decode_inputs(signature, request.inputs, max_bytes)
    return described(request), key, arrays


def described(request: InferRequest) -> InferRequest:
    """What answering needs of a request (id, outputs): its inputs may be views of the body, and its parameters
    (any JSON) may be too deep to pickle."""
    return dataclasses.replace(request, inputs=[], parameters={})

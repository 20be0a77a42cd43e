"""`pyserving warmup`: REST request bodies become a TF Serving warmup file.

Each body is decoded exactly as the REST API would decode it (against the
version's own signatures), then written as a `PredictionLog` record to
`<version>/assets.extra/tf_serving_warmup_requests`, a TFRecord file that
TF Serving reads too. `examples` bodies become classify or regress records,
whichever the signature's outputs (`classes`/`scores` or `outputs`) make it. A
signature without inputs, which REST cannot call, takes a body that names none
(`{"signature_name": "incr_counter"}`): its record is a PredictRequest without inputs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import prediction_log_pb2

from pyserving import tensors
from pyserving.errors import ServingError
from pyserving.protocols.tfs.json import examples, predict_request
from pyserving.protocols.tfs.json.document import signature_name
from pyserving.protocols.tfs.warmup import WARMUP_FILE
from pyserving.runtimes.servable import DEFAULT_SIGNATURE
from pyserving.serving import classify_regress
from pyserving.tools import ToolError
from pyserving.tools.inspect import newest_version, signatures_of

__all__ = ["write"]


def write(base_path: str, requests_file: str, version: int | None, tags: list[str]) -> tuple[str, int]:
    """Write the warmup file of `version` (default: newest); return its path and record count."""
    _, folder = newest_version(base_path, version)
    _, _, signatures = signatures_of(folder, tags)
    try:
        with open(requests_file, "rb") as handle:
            bodies = json.loads(handle.read())
    except json.JSONDecodeError as exc:
        raise ToolError(f"{requests_file} is not JSON: {exc}") from None
    if not isinstance(bodies, list) or not bodies:
        raise ToolError(f"{requests_file} must hold a non-empty JSON list of request bodies")
    name = os.path.basename(os.path.normpath(base_path))
    records = []
    for index, body in enumerate(bodies):
        try:
            records.append(_record(name, body, signatures).SerializeToString())
        except ServingError as exc:
            raise ToolError(f"request {index}: {exc.message}") from None
        except ToolError as exc:
            raise ToolError(f"request {index}: {exc}") from None
    path = os.path.join(folder, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path, len(records)


def _record(
    name: str, body: Any, signatures: dict[str, meta_graph_pb2.SignatureDef]
) -> prediction_log_pb2.PredictionLog:
    if not isinstance(body, dict):
        raise ToolError("each request body must be a JSON object")
    key = signature_name(body)
    signature = signatures.get(key or DEFAULT_SIGNATURE)
    if signature is None:
        raise ToolError(
            f'signature "{key or DEFAULT_SIGNATURE}" is not in the model (it has: {", ".join(sorted(signatures))})'
        )
    log = prediction_log_pb2.PredictionLog()
    if "examples" in body:
        request_input = examples.decode_input(body)
        if _is_classify(signature):
            request = log.classify_log.request
        else:
            classify_regress.check_regress_signature(signature, method_name_check=False)
            request = log.regress_log.request
        request.input.CopyFrom(request_input)
    elif not signature.inputs:
        # The REST API cannot call such a signature (no input map), but a PredictRequest without inputs can.
        if any(body.get(field) not in (None, {}, []) for field in ("inputs", "instances")):
            raise ToolError(
                f'signature "{key or DEFAULT_SIGNATURE}" has no inputs: its request body must name none '
                '(e.g. {"signature_name": "' + (key or DEFAULT_SIGNATURE) + '"})'
            )
        request = log.predict_log.request
    else:
        decoded = predict_request.decode_predict(body, signature, key, orjson.dumps(body))
        request = log.predict_log.request
        for alias, array in decoded.tensors.items():
            request.inputs[alias].CopyFrom(tensors.to_proto(array))
    request.model_spec.name = name
    request.model_spec.signature_name = key
    return log


def _is_classify(signature: meta_graph_pb2.SignatureDef) -> bool:
    try:
        classify_regress.check_classify_signature(signature, method_name_check=False)
    except ServingError:
        return False
    return True

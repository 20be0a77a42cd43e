"""REST request bodies parsed and decoded in one call, so that a codec process (`workers.codecs`) can run the
whole of it for a big body. Each is also what `rest_api` does in this process, step by step, for a small one.
"""

from __future__ import annotations

from collections.abc import Mapping

from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import input_pb2

from pyserving.errors import invalid_argument
from pyserving.protocols.tfs.json import examples
from pyserving.protocols.tfs.json.document import parse_object, signature_name
from pyserving.protocols.tfs.json.predict_request import PredictInputs, decode_predict, parse_predict
from pyserving.runtimes.servable import DEFAULT_SIGNATURE

__all__ = [
    "CHECK_PREDICT",
    "DECODE_EXAMPLES",
    "DECODE_PREDICT",
    "ENCODE_PREDICT",
    "check_predict",
    "decode_examples",
    "decode_predict_body",
    "predict_signature",
]

# The functions as `CodecProcesses.run` names them.
DECODE_PREDICT = f"{__name__}:decode_predict_body"
CHECK_PREDICT = f"{__name__}:check_predict"
DECODE_EXAMPLES = f"{__name__}:decode_examples"
ENCODE_PREDICT = "pyserving.protocols.tfs.json.predict_response:encode_predict"

_Signatures = Mapping[str, meta_graph_pb2.SignatureDef]


def predict_signature(signatures: _Signatures, key: str) -> meta_graph_pb2.SignatureDef:
    """The signature a predict body names (`key`, or the default one), with TF Serving's error if there is none."""
    signature = signatures.get(key or DEFAULT_SIGNATURE)
    if signature is None:
        raise invalid_argument(f'Serving signature name: "{key}" not found in signature def')
    return signature


def decode_predict_body(body: bytes | memoryview, signatures: _Signatures) -> tuple[str, PredictInputs]:
    """(signature name, tensors) of a predict body, against the signatures of the version it targets."""
    data = bytes(body)
    doc = parse_predict(data)
    key = signature_name(doc)
    return key, decode_predict(doc, predict_signature(signatures, key), key, data)


def check_predict(body: bytes | memoryview) -> None:
    """The errors a predict body gets before its model is looked up (TF Serving parses first)."""
    signature_name(parse_predict(bytes(body)))


def decode_examples(body: bytes | memoryview) -> tuple[str, input_pb2.Input]:
    """(signature name, Input) of a classify or regress body."""
    doc = parse_object(bytes(body))
    return signature_name(doc), examples.decode_input(doc)

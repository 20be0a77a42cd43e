"""Coverage-guided fuzzing (atheris) of the REST decoders: JSON to tensors, and JSON to tf.Example.

Every input is parsed as a REST body and decoded against a set of signatures
(float, string, int64, bool, two inputs) and as classify/regress `examples`.
`ServingError` is the expected answer to bad input; anything else is a bug, and so is
any difference between the numeric fast path (`json.numeric`) and the general parser.

  Short run (CI does this):  python fuzz/fuzz_decoders.py -runs=20000 CORPUS_COPY
  Long run:                  python fuzz/fuzz_decoders.py -max_total_time=3600 -jobs=2 CORPUS_COPY
Run it on a copy of fuzz/corpus: libFuzzer adds the inputs it finds to the folder it is given.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import atheris
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

with atheris.instrument_imports(include=["pyserving"]):
    from pyserving.errors import ServingError
    from pyserving.protocols.tfs.json import document, examples, numeric, predict_request


def _signature(**inputs: int) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for alias, dtype in inputs.items():
        signature.inputs[alias].name = f"{alias}:0"
        signature.inputs[alias].dtype = dtype
    return signature


SIGNATURES = [
    _signature(x=types_pb2.DT_FLOAT),
    _signature(x=types_pb2.DT_STRING),
    _signature(x=types_pb2.DT_INT64),
    _signature(x=types_pb2.DT_BOOL),
    _signature(a=types_pb2.DT_FLOAT, b=types_pb2.DT_INT32),
    _signature(x=types_pb2.DT_HALF),
]


def _predict_outcome(parse, data: bytes, signature: meta_graph_pb2.SignatureDef):
    """Tensors (dtype, shape, contents) and format, or the error message."""
    try:
        doc = parse(data)
        inputs = predict_request.decode_predict(doc, signature, document.signature_name(doc), data)
    except ServingError as exc:
        return exc.message
    return inputs.format, {
        name: (a.dtype, a.shape, a.tolist() if a.dtype == object else a.tobytes()) for name, a in inputs.tensors.items()
    }


def _numeric_first(data: bytes) -> dict:
    """`predict_request.parse_predict` whatever the body's size (it skips `numeric` for small ones)."""
    return numeric.parse(data) or document.parse_object(data)


def test_one_input(data: bytes) -> None:
    # The fast path for numeric arrays must give exactly what the general path gives.
    for signature in SIGNATURES:
        general = _predict_outcome(document.parse_object, data, signature)
        fast = _predict_outcome(_numeric_first, data, signature)
        if fast != general:
            raise AssertionError(f"numeric differs on {data!r}: {fast!r} != {general!r}")
    try:
        doc = document.parse_object(data)
    except ServingError:
        return
    try:
        examples.decode_input(doc)
    except ServingError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

"""Coverage-guided fuzzing (atheris) of the REST decoders: JSON to tensors, and JSON to tf.Example.

Every input is parsed as a REST body and decoded against a set of signatures
(float, string, int64, bool, two inputs) and as classify/regress `examples`.
`ServingError` is the expected answer to bad input; anything else is a bug.

  Short run (CI does this):  python fuzz/fuzz_decoders.py -runs=20000 CORPUS_COPY
  Long run:                  python fuzz/fuzz_decoders.py -max_total_time=3600 -jobs=2 CORPUS_COPY
Run it on a copy of fuzz/corpus: libFuzzer adds the inputs it finds to the folder it is given.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import atheris  # noqa: E402
from tensorflow.core.framework import types_pb2  # noqa: E402  (TensorFlow loads here, uninstrumented)
from tensorflow.core.protobuf import meta_graph_pb2  # noqa: E402

with atheris.instrument_imports(include=["pyserving"]):
    from pyserving import json_codec, json_examples
    from pyserving.errors import ServingError


def _signature(**inputs: int) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for alias, dtype in inputs.items():
        signature.inputs[alias].name = f"{alias}:0"
        signature.inputs[alias].dtype = dtype
    return signature


SIGNATURES = [
    _signature(x=types_pb2.DT_FLOAT), _signature(x=types_pb2.DT_STRING), _signature(x=types_pb2.DT_INT64),
    _signature(x=types_pb2.DT_BOOL), _signature(a=types_pb2.DT_FLOAT, b=types_pb2.DT_INT32),
    _signature(x=types_pb2.DT_HALF),
]


def test_one_input(data: bytes) -> None:
    try:
        doc = json_codec.parse_object(data)
        key = json_codec.signature_name(doc)
    except ServingError:
        return
    for signature in SIGNATURES:
        try:
            json_codec.decode_predict(doc, signature, key, data)
        except ServingError:
            pass
    try:
        json_examples.decode_input(doc)
    except ServingError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

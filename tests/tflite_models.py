"""TFLite models the tests convert themselves, shaped like TF Serving's TFLite test data.

- `tflite_half_plus_two(signature="none")`: like `saved_model_half_plus_two_tflite`: a TF1 graph
  converted from its session, tensors `x` and `y` (float [1, 1]), and no signature at all.
- `signature="metadata"`: like `saved_model_half_plus_two_tflite_with_sigdef`: the input tensor is
  `tflite_input`, and a `signature_defs_metadata` entry (a flexbuffer map of serialized SignatureDefs,
  TF Serving's format) maps `x` -> `tflite_input:0` and `y` -> `y:0`.
- `signature="runner"`: converted from a TF2 SavedModel, so the flatbuffer has signature runner
  signatures: `serving_default` x -> y, batch dimension dynamic.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

_PREDICT = "tensorflow/serving/predict"


def tflite_half_plus_two(signature: str = "none", plus: float = 2.0) -> bytes:
    """A model.tflite computing y = 0.5 * x + `plus` (see the module's docstring for `signature`)."""
    if signature == "runner":
        return _from_saved_model(plus)
    content = _from_session("tflite_input" if signature == "metadata" else "x", plus)
    if signature == "metadata":
        content = with_signature_metadata(
            content, {"serving_default": _signature({"x": "tflite_input:0"}, {"y": "y:0"})}
        )
    return content


def write_tflite(base: Path, version: int, content: bytes) -> Path:
    """Write `content` as base/<version>/model.tflite."""
    folder = base / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.tflite").write_bytes(content)
    return folder


def _from_session(input_name: str, plus: float) -> bytes:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 1], name=input_name)
        y = tf.identity(x * 0.5 + plus, name="y")
        with tf.compat.v1.Session(graph=graph) as session:
            return tf.compat.v1.lite.TFLiteConverter.from_session(session, [x], [y]).convert()


class _HalfPlus(tf.Module):
    def __init__(self, plus: float) -> None:
        super().__init__()
        self.plus = plus

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    def serve(self, x):
        return {"y": x * 0.5 + self.plus}


def _from_saved_model(plus: float) -> bytes:
    import tempfile

    module = _HalfPlus(plus)
    with tempfile.TemporaryDirectory() as folder:
        tf.saved_model.save(module, folder, signatures={"serving_default": module.serve})
        return tf.lite.TFLiteConverter.from_saved_model(folder).convert()


def _signature(inputs: dict[str, str], outputs: dict[str, str]) -> meta_graph_pb2.SignatureDef:
    shape = tensor_shape_pb2.TensorShapeProto(dim=[{"size": 1}, {"size": 1}])
    signature = meta_graph_pb2.SignatureDef(method_name=_PREDICT)
    for target, names in ((signature.inputs, inputs), (signature.outputs, outputs)):
        for alias, name in names.items():
            target[alias].CopyFrom(meta_graph_pb2.TensorInfo(name=name, dtype=types_pb2.DT_FLOAT, tensor_shape=shape))
    return signature


def with_signature_metadata(content: bytes, signatures: dict[str, meta_graph_pb2.SignatureDef]) -> bytes:
    """`content` with a `signature_defs_metadata` entry holding `signatures`, as TF Lite's
    signature_def_util writes it: a flexbuffer map of signature key -> serialized SignatureDef."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    from flatbuffers import flexbuffers

    builder = flexbuffers.Builder()
    with builder.Map():
        for key in sorted(signatures):
            builder.Key(key)
            builder.Blob(signatures[key].SerializeToString())  # TF Lite writes a string; both read the same
    model = flatbuffer_utils.convert_bytearray_to_object(content)
    buffer = schema.BufferT()
    buffer.data = list(bytes(builder.Finish()))
    model.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = "signature_defs_metadata"
    metadata.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), metadata]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))

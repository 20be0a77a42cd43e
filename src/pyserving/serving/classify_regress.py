"""Classify and Regress signatures: TF Serving's rules for checking them, feeding them and reading them.

A classify or regress signature takes one input keyed `inputs`: a 1-D string
tensor of serialized `tf.Example`s. Classify reads `classes` (strings) and/or
`scores` (floats), both [batch, num_classes]; regress reads `outputs`, [batch] or
[batch, 1] floats. Checks and messages follow TF Serving's classifier.cc and
regressor.cc, in their order.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from pyserving import tensors
from pyserving.errors import invalid_argument
from pyserving.runtimes.servable import CLASSIFY_METHOD, REGRESS_METHOD

__all__ = [
    "CLASSES",
    "INPUTS",
    "OUTPUTS",
    "SCORES",
    "check_classify_signature",
    "check_regress_signature",
    "classification_result",
    "regression_result",
    "serialized_examples",
]

INPUTS = "inputs"
CLASSES = "classes"
SCORES = "scores"
OUTPUTS = "outputs"


def check_classify_signature(signature: meta_graph_pb2.SignatureDef, method_name_check: bool) -> list[str]:
    """Validate a classification signature; return the output aliases to fetch (classes, scores)."""
    if method_name_check and signature.method_name != CLASSIFY_METHOD:
        raise invalid_argument(
            f"Expected classification signature method_name to be {CLASSIFY_METHOD}. Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise invalid_argument(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if INPUTS not in signature.inputs:
        raise invalid_argument(f"No classification inputs found in SignatureDef: {_debug(signature)}")
    aliases = [a for a in (CLASSES, SCORES) if a in signature.outputs]
    if not aliases:
        raise invalid_argument(
            'Expected classification signature outputs to contain at least one of "classes" or '
            f'"scores". Signature was: {_debug(signature)}'
        )
    return aliases


def check_regress_signature(signature: meta_graph_pb2.SignatureDef, method_name_check: bool) -> list[str]:
    """Validate a regression signature; return the output aliases to fetch (outputs)."""
    if method_name_check and signature.method_name != REGRESS_METHOD:
        raise invalid_argument(
            f"Expected regression signature method_name to be {REGRESS_METHOD}. Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) != 1:
        raise invalid_argument("Expected one output Tensor.")
    if INPUTS not in signature.inputs:
        raise invalid_argument(f"No regression inputs found in SignatureDef: {_debug(signature)}")
    if OUTPUTS not in signature.outputs:
        raise invalid_argument(f"No regression outputs found in SignatureDef: {_debug(signature)}")
    return [OUTPUTS]


def serialized_examples(request_input: input_pb2.Input, max_bytes: int = 0) -> np.ndarray:
    """The signature's input tensor: one serialized example per element, the context's bytes first.

    Concatenated serializations parse as a merge, so an example's feature replaces
    the context's feature of the same name, as in TF Serving. With `max_bytes` (> 0), a tensor
    that would take more is refused before it is built (a big context is copied into every example).
    """
    kind = request_input.WhichOneof("kind")
    context = b""
    if kind == "example_list":
        serialized = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        with_context = request_input.example_list_with_context
        context = with_context.context.SerializeToString()
        serialized = [e.SerializeToString() for e in with_context.examples]
    else:
        serialized = []
    if not serialized:
        raise invalid_argument("Input is empty.")
    if max_bytes > 0:
        size = len(serialized) * (8 + len(context)) + sum(map(len, serialized))
        tensors.check_decoded_bytes([(INPUTS, [len(serialized)], size)], max_bytes)
    array = np.empty(len(serialized), dtype=object)
    array[:] = [context + e for e in serialized] if context else serialized
    return array


def classification_result(outputs: dict[str, np.ndarray], num_examples: int) -> classification_pb2.ClassificationResult:
    """Pair classes and scores per example; a missing `classes` gives "" labels, missing `scores` 0."""
    expected = {CLASSES: types_pb2.DT_STRING, SCORES: types_pb2.DT_FLOAT}
    for alias, array in outputs.items():
        if array.ndim != 2:
            raise invalid_argument(f"Expected Tensor shape: [batch_size num_classes] but got {_shape(array)}")
        dtype = tensors.dtype_of(array)
        if dtype != expected[alias]:
            raise invalid_argument(
                f"Expected {alias} Tensor of {types_pb2.DataType.Name(expected[alias])}. "
                f"Got: {types_pb2.DataType.Name(dtype)}"
            )
        if array.shape[0] != num_examples:
            raise invalid_argument(f"Expected {alias} output batch size of {num_examples}. Got: {array.shape[0]}")
    classes, scores = outputs.get(CLASSES), outputs.get(SCORES)
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid_argument(
            f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. {scores.shape[1]}"
        )
    shaped = classes if classes is not None else scores
    if shaped is None:
        raise invalid_argument("Expected classification signature outputs to contain classes or scores")
    num_classes = shaped.shape[1]
    labels = (
        np.vectorize(_label, otypes=[object])(classes)
        if classes is not None and classes.size
        else np.full((num_examples, num_classes), "", dtype=object)
    )
    values = scores.tolist() if scores is not None else [[0.0] * num_classes] * num_examples
    result = classification_pb2.ClassificationResult()
    for example_labels, example_scores in zip(labels.tolist(), values, strict=True):
        result.classifications.add().classes.extend(
            classification_pb2.Class(label=label, score=score)
            for label, score in zip(example_labels, example_scores, strict=True)
        )
    return result


def regression_result(output: np.ndarray, num_examples: int) -> regression_pb2.RegressionResult:
    if not (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        raise invalid_argument(
            f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got {_shape(output)}"
        )
    if output.shape[0] != num_examples:
        raise invalid_argument(
            f"Input batch size did not match output batch size: {num_examples} vs. {output.shape[0]}"
        )
    dtype = tensors.dtype_of(output)
    if dtype != types_pb2.DT_FLOAT:
        raise invalid_argument(f"Expected output Tensor of DT_FLOAT.  Got: {types_pb2.DataType.Name(dtype)}")
    result = regression_pb2.RegressionResult()
    result.regressions.extend(regression_pb2.Regression(value=v) for v in output.reshape(-1).tolist())
    return result


def _label(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _shape(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"


def _debug(signature: meta_graph_pb2.SignatureDef) -> str:
    """protobuf's DebugString (text format) of a signature, as TF Serving prints it."""
    return text_format.MessageToString(signature)

"""ONNX runtime: a version folder holding `model.onnx`, run by ONNX Runtime (`pip install 'pyserving[onnx]'`).

The graph becomes one `serving_default` predict signature whose input and output
aliases are the graph's own names, so every TF Serving API that works on a predict
signature (REST row and columnar, gRPC Predict, metadata, batching, warmup) works
unchanged. Dimensions that ONNX leaves symbolic or unknown are -1. ONNX Runtime
reports a tensor of unknown rank with the same empty shape as a scalar, so such a
tensor is described as a scalar. Inputs and outputs that are not tensors
(sequences and maps, such as a ZipMap classifier output) fail the load: TF
Serving's APIs cannot carry them.

A graph shaped like a classifier or regressor also answers Classify, Regress and
MultiInference, which feed serialized tf.Examples: outputs named `scores` (float,
rank 2) and/or `classes` (string or int64, rank 2) add a `classify` signature, an
output named `outputs` (float, [batch] or [batch, 1]) a `regress` signature. Their
one input `inputs` (strings [-1]) is parsed here into the graph's inputs by feature
name, each input of shape [batch] or [batch, k] and type float, int64 or string
being a fixed-length feature of that shape, with TF's parse_example messages. A
graph with any other input offers neither. int64 classes answer as their decimal
strings: TF Serving's class labels are strings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving import tensors
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.runtimes.registry import RuntimeOptions
from pyserving.runtimes.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, PREDICT_METHOD, REGRESS_METHOD

__all__ = ["CLASSIFY_SIGNATURE", "MODEL_FILE", "REGRESS_SIGNATURE", "OnnxServable", "load", "signature_defs"]

MODEL_FILE = "model.onnx"
CLASSIFY_SIGNATURE = "classify"
REGRESS_SIGNATURE = "regress"
# The aliases TF Serving's Classify and Regress use (see serving.classify_regress); here they are also
# the names of the graph outputs that make a graph a classifier or a regressor.
_INPUTS, _CLASSES, _SCORES, _OUTPUTS = "inputs", "classes", "scores", "outputs"

# ONNX Runtime's tensor type names -> TF dtypes.
_DTYPES = {
    "tensor(float)": types_pb2.DT_FLOAT,
    "tensor(double)": types_pb2.DT_DOUBLE,
    "tensor(float16)": types_pb2.DT_HALF,
    "tensor(bfloat16)": types_pb2.DT_BFLOAT16,
    "tensor(int8)": types_pb2.DT_INT8,
    "tensor(int16)": types_pb2.DT_INT16,
    "tensor(int32)": types_pb2.DT_INT32,
    "tensor(int64)": types_pb2.DT_INT64,
    "tensor(uint8)": types_pb2.DT_UINT8,
    "tensor(uint16)": types_pb2.DT_UINT16,
    "tensor(uint32)": types_pb2.DT_UINT32,
    "tensor(uint64)": types_pb2.DT_UINT64,
    "tensor(bool)": types_pb2.DT_BOOL,
    "tensor(string)": types_pb2.DT_STRING,
    "tensor(complex64)": types_pb2.DT_COMPLEX64,
    "tensor(complex128)": types_pb2.DT_COMPLEX128,
}

# ONNX Runtime's exception classes (by name: they live in its private pybind module) -> canonical codes,
# for errors raised by a run. A failing node (bad shapes, broadcasting) is the request's fault, as in TF.
_RUN_CODES = {
    "InvalidArgument": Code.INVALID_ARGUMENT,
    "Fail": Code.INVALID_ARGUMENT,
    "RuntimeException": Code.INVALID_ARGUMENT,
    "NotImplemented": Code.UNIMPLEMENTED,
}
# ... and for errors raised by a load.
_LOAD_CODES = {"NoSuchFile": Code.NOT_FOUND, "InvalidProtobuf": Code.DATA_LOSS, "NotImplemented": Code.UNIMPLEMENTED}


def _ort() -> Any:
    """onnxruntime, imported on first use so that servers without ONNX models never need it."""
    try:
        import onnxruntime
    except ImportError:
        raise ServingError(
            Code.FAILED_PRECONDITION,
            "model_platform onnx needs ONNX Runtime, which is not installed: pip install 'pyserving[onnx]'",
        ) from None
    return onnxruntime


def _message(exc: Exception) -> str:
    """ONNX Runtime's text without its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " prefix."""
    text = str(exc)
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text


def _session(path: str, options: RuntimeOptions, optimize: bool) -> Any:
    """An InferenceSession for the version folder's model; `ServingError` if it is missing or does not load.

    `--tensorflow_intra_op_parallelism` sizes the session's intra-op pool (0: ONNX Runtime's default, one
    thread per physical core). ONNX Runtime runs independent nodes side by side only in its parallel
    execution mode, so a positive `--tensorflow_inter_op_parallelism` above 1 turns that on with a pool of
    that size; 0 (auto) and 1 keep the sequential mode, which is faster for the usual chain of layers.
    Idle pool threads sleep instead of spinning: a server's cores are shared with its event loop, gRPC and
    batch threads, and a spinning pool took them (2-core dev machine, busy: a 32-row CNN batch took 3.7
    ms without spinning against 6.6-11.5 ms with it).
    """
    file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(file):
        raise ServingError(Code.NOT_FOUND, f"Could not find {MODEL_FILE} at supplied export directory path: {path}")
    ort = _ort()
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3  # errors only: its load-time warnings are not the server's
    session_options.intra_op_num_threads = max(options.intra_op_parallelism, 0)
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if options.inter_op_parallelism > 1:
        session_options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        session_options.inter_op_num_threads = options.inter_op_parallelism
    if not optimize:
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(file, session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        code, message = _LOAD_CODES.get(type(exc).__name__, Code.INVALID_ARGUMENT), _message(exc)
        raise ServingError(code, message if file in message else f"{file}: {message}") from None


def _tensor_info(arg: Any, kind: str) -> meta_graph_pb2.TensorInfo:
    """A graph input or output (an ONNX Runtime NodeArg) as TF Serving describes a tensor."""
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ServingError(
            Code.UNIMPLEMENTED,
            f"The ONNX model's {kind} {arg.name} is a {arg.type}, which TF Serving's APIs cannot carry; "
            "only tensors of numeric, bool and string types are served",
        )
    info = meta_graph_pb2.TensorInfo(name=arg.name, dtype=dtype)
    info.tensor_shape.SetInParent()
    for dim in arg.shape:
        info.tensor_shape.dim.add(size=dim if isinstance(dim, int) and dim >= 0 else -1)
    return info


def _signature(session: Any) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    for arg in session.get_inputs():
        signature.inputs[arg.name].CopyFrom(_tensor_info(arg, "input"))
    for arg in session.get_outputs():
        signature.outputs[arg.name].CopyFrom(_tensor_info(arg, "output"))
    return signature


@dataclass(frozen=True, slots=True)
class _Feature:
    """A graph input fed from a fixed-length tf.Example feature of the same name."""

    name: str
    kind: str  # the Feature oneof field: float_list, int64_list or bytes_list
    dtype: type
    shape: tuple[int, ...]  # one example's: () or (k,)


# Graph input dtype -> (Feature kind, numpy dtype); parse_example's FixedLenFeature takes only these.
_FEATURE_KINDS = {
    types_pb2.DT_FLOAT: ("float_list", np.float32),
    types_pb2.DT_INT64: ("int64_list", np.int64),
    types_pb2.DT_STRING: ("bytes_list", object),
}
# Feature kind -> TF's names for it in parse_example's messages: (data type, "Number of ... values").
_KIND_NAMES = {"float_list": ("float", "float"), "int64_list": ("int64", "int64"), "bytes_list": ("string", "bytes")}


def _features(predict: meta_graph_pb2.SignatureDef) -> list[_Feature] | None:
    """The graph's inputs as tf.Example features, or None when one of them cannot be a fixed-length feature."""
    features = []
    for name, info in sorted(predict.inputs.items()):
        dims = [d.size for d in info.tensor_shape.dim]
        if info.dtype not in _FEATURE_KINDS or len(dims) not in (1, 2) or (len(dims) == 2 and dims[1] < 1):
            return None
        kind, dtype = _FEATURE_KINDS[info.dtype]
        features.append(_Feature(name, kind, dtype, tuple(dims[1:])))
    return features


def _example_signatures(predict: meta_graph_pb2.SignatureDef) -> dict[str, meta_graph_pb2.SignatureDef]:
    """`classify` and/or `regress` when the graph's inputs are features and its outputs have those names."""
    if not predict.inputs or _features(predict) is None:
        return {}
    inputs = meta_graph_pb2.TensorInfo(name=_INPUTS, dtype=types_pb2.DT_STRING)
    inputs.tensor_shape.dim.add(size=-1)

    def rank(alias: str, *dtypes: int) -> int:
        info = predict.outputs.get(alias)
        return len(info.tensor_shape.dim) if info is not None and info.dtype in dtypes else -1

    signatures = {}
    classify = meta_graph_pb2.SignatureDef(method_name=CLASSIFY_METHOD)
    if rank(_SCORES, types_pb2.DT_FLOAT) == 2:
        classify.outputs[_SCORES].CopyFrom(predict.outputs[_SCORES])
    if rank(_CLASSES, types_pb2.DT_STRING, types_pb2.DT_INT64) == 2:
        classify.outputs[_CLASSES].CopyFrom(predict.outputs[_CLASSES])
        classify.outputs[_CLASSES].dtype = types_pb2.DT_STRING  # int64 classes answer as strings
    if classify.outputs:
        classify.inputs[_INPUTS].CopyFrom(inputs)
        signatures[CLASSIFY_SIGNATURE] = classify
    outputs_rank = rank(_OUTPUTS, types_pb2.DT_FLOAT)
    if outputs_rank == 1 or (outputs_rank == 2 and predict.outputs[_OUTPUTS].tensor_shape.dim[1].size == 1):
        regress = meta_graph_pb2.SignatureDef(method_name=REGRESS_METHOD)
        regress.inputs[_INPUTS].CopyFrom(inputs)
        regress.outputs[_OUTPUTS].CopyFrom(predict.outputs[_OUTPUTS])
        signatures[REGRESS_SIGNATURE] = regress
    return signatures


def _all_signatures(session: Any) -> dict[str, meta_graph_pb2.SignatureDef]:
    predict = _signature(session)
    return {DEFAULT_SIGNATURE: predict, **_example_signatures(predict)}


def signature_defs(path: str, options: RuntimeOptions) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The signatures a version folder would serve, for tools: the graph is opened without optimizing it
    (ONNX Runtime is the only reader of the format pyserving depends on); nothing is run."""
    return _all_signatures(_session(path, options, optimize=False))


def _parse_examples(features: Sequence[_Feature], serialized: np.ndarray) -> dict[str, np.ndarray]:
    """Serialized tf.Examples as the graph's inputs, as parse_example with FixedLenFeatures and no defaults
    would give them, and with its messages. Parsed with protobuf rather than TF's op: for the few examples
    of a request, TF's eager op took 1.1-1.6 ms against 8 us (1 example) to 125 us (32) here."""
    examples = []
    for value in serialized.reshape(-1).tolist():
        try:
            examples.append(example_pb2.Example.FromString(value))
        except (DecodeError, TypeError):
            raise invalid_argument(f"Name: <unknown>, Could not parse example input, value: {value!r:.200}") from None
    feeds = {}
    for feature in features:
        data_type, values_name = _KIND_NAMES[feature.kind]
        size = feature.shape[0] if feature.shape else 1
        rows = []
        for index, example in enumerate(examples):
            entries = example.features.feature
            kind = entries[feature.name].WhichOneof("kind") if feature.name in entries else None
            if kind is None:
                raise invalid_argument(
                    f"Name: <unknown>, Feature: {feature.name} (data type: {data_type}) is required but could not "
                    "be found."
                )
            if kind != feature.kind:
                raise invalid_argument(
                    f"Name: <unknown>, Key: {feature.name}, Index: {index}.  Data types don't match. "
                    f"Data type: {_KIND_NAMES[kind][0]} but expected type: {data_type}"
                )
            values = getattr(entries[feature.name], kind).value
            if len(values) != size:
                raise invalid_argument(
                    f"Name: <unknown>, Key: {feature.name}, Index: {index}.  Number of {values_name} values != "
                    f"expected.  Values size: {len(values)} but output shape: [{','.join(map(str, feature.shape))}]"
                )
            rows.append(list(values))
        array: np.ndarray = np.empty((len(rows), size), dtype=feature.dtype)
        array[:] = rows
        feeds[feature.name] = array.reshape((len(rows), *feature.shape))
    return feeds


def load(path: str, options: RuntimeOptions) -> OnnxServable:
    """The registry's entry point: an ONNX version folder as a servable."""
    return OnnxServable(_session(path, options, optimize=True))


def _to_text(array: np.ndarray, alias: str) -> np.ndarray:
    """A string tensor as ONNX Runtime takes it: `str` objects (it would write a `bytes` object's repr)."""
    try:
        return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(array)
    except UnicodeDecodeError:
        raise ServingError(
            Code.INVALID_ARGUMENT, f"Input {alias} of the ONNX model takes UTF-8 strings; a value is not UTF-8"
        ) from None


def _to_bytes(array: np.ndarray) -> np.ndarray:
    """A string output as the rest of pyserving holds strings: `bytes` objects."""
    return np.vectorize(lambda v: v.encode("utf-8") if isinstance(v, str) else v, otypes=[object])(array)


class OnnxServable:
    """One ONNX model version in its own InferenceSession (whose `run` is safe to call from many threads).

    Timeouts are not applied: ONNX Runtime cannot cancel a run it has started.
    """

    runtime = "ONNX"  # the runtime_latency label

    def __init__(self, session: Any) -> None:
        self._session = session
        self._signature_defs = _all_signatures(session)
        predict = self._signature_defs[DEFAULT_SIGNATURE]
        self._features = _features(predict) or []  # used only when there are example signatures
        self._text_inputs = frozenset(a.name for a in session.get_inputs() if a.type == "tensor(string)")
        self._input_dtypes = {  # alias -> (numpy dtype, TF dtype)
            alias: (tensors.numpy_dtype(info.dtype), info.dtype) for alias, info in predict.inputs.items()
        }
        self._text_outputs = frozenset(a.name for a in session.get_outputs() if a.type == "tensor(string)")
        classify = self._signature_defs.get(CLASSIFY_SIGNATURE)
        self._int_classes = (
            classify is not None
            and _CLASSES in classify.outputs
            and predict.outputs[_CLASSES].dtype == types_pb2.DT_INT64
        )

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        if signature_name == DEFAULT_SIGNATURE:
            return self._run_graph(self._checked(inputs), output_aliases)
        outputs = self._run_graph(self._parsed(inputs), output_aliases)
        if self._int_classes and _CLASSES in output_aliases:  # TF Serving's labels are strings
            outputs = [
                v.astype(np.bytes_).astype(object) if a == _CLASSES else v
                for a, v in zip(output_aliases, outputs, strict=True)
            ]
        return outputs

    def _checked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The predict signature's feeds, refused when one has another dtype than its graph input."""
        for alias, array in inputs.items():
            expected, dtype = self._input_dtypes[alias]
            if array.dtype != expected:  # TF's own words for a feed of the wrong type (DirectSession)
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"Expects input {alias} to be {tensors.type_name(dtype)} but "
                    f"{tensors.type_name(tensors.dtype_of(array))} is provided",
                )
        return inputs

    def _parsed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A classify or regress signature's one input, serialized tf.Examples, as the graph's inputs."""
        examples = inputs[_INPUTS]
        if tensors.dtype_of(examples) != types_pb2.DT_STRING:
            raise invalid_argument(
                f"Expects input {_INPUTS} to be string but {tensors.type_name(tensors.dtype_of(examples))} is provided"
            )
        return _parse_examples(self._features, examples)

    def _run_graph(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        if self._text_inputs:
            inputs = {a: _to_text(v, a) if a in self._text_inputs else v for a, v in inputs.items()}
        try:
            outputs: list[np.ndarray] = self._session.run(output_names, inputs)
        except Exception as exc:
            code = _RUN_CODES.get(type(exc).__name__)
            if code is None and isinstance(exc, RuntimeError):  # its Python binding refusing a value
                code = Code.INVALID_ARGUMENT
            if code is None:
                raise
            raise ServingError(code, _message(exc)) from None
        if self._text_outputs:
            outputs = [
                _to_bytes(v) if a in self._text_outputs else v for a, v in zip(output_names, outputs, strict=True)
            ]
        return outputs

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        """One graph run for every task: classify and regress share the parsed examples, and the predict
        signature has nothing to share with them."""
        keys = {key for key, _ in tasks}
        if DEFAULT_SIGNATURE in keys and len(keys) > 1:
            raise invalid_argument(
                f"The ONNX model's {DEFAULT_SIGNATURE} signature cannot run in one request with its example "
                f"signatures: {', '.join(sorted(keys - {DEFAULT_SIGNATURE}))}"
            )
        names = sorted({alias for _, aliases in tasks for alias in aliases})
        values = dict(zip(names, self.run(tasks[0][0], inputs, names, timeout_ms), strict=True))
        return [[values[alias] for alias in aliases] for _, aliases in tasks]

    def close(self) -> None:
        self._session = None

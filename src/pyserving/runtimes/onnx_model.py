"""ONNX runtime: a version folder holding `model.onnx`, run by ONNX Runtime (`pip install 'pyserving[onnx]'`).

The graph becomes one `serving_default` predict signature whose input and output
aliases are the graph's own names, so every TF Serving API that works on a predict
signature (REST row and columnar, gRPC Predict, metadata, batching, warmup) works
unchanged. Dimensions that ONNX leaves symbolic or unknown are -1. ONNX Runtime
reports a tensor of unknown rank with the same empty shape as a scalar, so such a
tensor is described as a scalar. Inputs and outputs that are not tensors
(sequences and maps, such as a ZipMap classifier output) fail the load: TF
Serving's APIs cannot carry them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving import tensors
from pyserving.errors import Code, ServingError
from pyserving.runtimes.registry import RuntimeOptions
from pyserving.runtimes.servable import DEFAULT_SIGNATURE, PREDICT_METHOD

__all__ = ["MODEL_FILE", "OnnxServable", "load", "signature_defs"]

MODEL_FILE = "model.onnx"

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


def signature_defs(path: str, options: RuntimeOptions) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The signatures a version folder would serve, for tools: the graph is opened without optimizing it
    (ONNX Runtime is the only reader of the format pyserving depends on); nothing is run."""
    return {DEFAULT_SIGNATURE: _signature(_session(path, options, optimize=False))}


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
        self._signature_defs = {DEFAULT_SIGNATURE: _signature(session)}
        self._text_inputs = frozenset(a.name for a in session.get_inputs() if a.type == "tensor(string)")
        self._input_dtypes = {  # alias -> (numpy dtype, TF dtype)
            alias: (tensors.numpy_dtype(info.dtype), info.dtype)
            for alias, info in self._signature_defs[DEFAULT_SIGNATURE].inputs.items()
        }
        self._text_outputs = frozenset(a.name for a in session.get_outputs() if a.type == "tensor(string)")

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        for alias, array in inputs.items():
            expected, dtype = self._input_dtypes[alias]
            if array.dtype != expected:  # TF's own words for a feed of the wrong type (DirectSession)
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"Expects input {alias} to be {tensors.type_name(dtype)} but "
                    f"{tensors.type_name(tensors.dtype_of(array))} is provided",
                )
        if self._text_inputs:
            inputs = {a: _to_text(v, a) if a in self._text_inputs else v for a, v in inputs.items()}
        try:
            outputs: list[np.ndarray] = self._session.run(output_aliases, inputs)
        except Exception as exc:
            code = _RUN_CODES.get(type(exc).__name__)
            if code is None and isinstance(exc, RuntimeError):  # its Python binding refusing a value
                code = Code.INVALID_ARGUMENT
            if code is None:
                raise
            raise ServingError(code, _message(exc)) from None
        if self._text_outputs:
            outputs = [
                _to_bytes(v) if a in self._text_outputs else v for a, v in zip(output_aliases, outputs, strict=True)
            ]
        return outputs

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        names = sorted({alias for _, aliases in tasks for alias in aliases})
        values = dict(zip(names, self.run(DEFAULT_SIGNATURE, inputs, names, timeout_ms), strict=True))
        return [[values[alias] for alias in aliases] for _, aliases in tasks]

    def close(self) -> None:
        self._session = None

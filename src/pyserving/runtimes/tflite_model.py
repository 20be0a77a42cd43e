"""TFLite runtime: a version folder's `model.tflite` through the LiteRT interpreter (`--prefer_tflite_model`).

The interpreter is `ai_edge_litert.interpreter.Interpreter` (the `pyserving[tflite]` extra), the maintained
successor of `tf.lite.Interpreter`, which TF 2.21 deprecates. Signatures follow TF Serving's TfLiteSession:

- a SignatureDef map in the model's `signature_defs_metadata` (what TF Serving's tooling embeds) is served
  as written, its tensor names matched to the model's tensors (also without their `:0` suffix);
- otherwise the signature runner's signatures (what today's converter writes), their input and output
  names as aliases (TF Serving ignores these and would fall through to the next case);
- otherwise one `serving_default` predict signature made from the primary subgraph's input and output
  tensors, each aliased by its name without a `:N` suffix.

Reported shapes are the tensors' current dimensions, as TF Serving reports them (a dynamic batch shows
as 1). An input whose shape differs from the tensor's is resized to it, so any batch size runs.

An interpreter is not thread-safe, so a version holds `--num_tflite_pools` x
`--num_tflite_interpreters_per_pool` of them (each with one thread, as TF Serving builds them) and a
call takes a free one, waiting if there is none. With more than one interpreter per pool, TF Serving
splits a large request into mini-batches run on its pool's interpreters at once; this runtime splits
it the same way, over any free interpreters of the version (requests are merged by `--enable_batching`).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving import tensors
from pyserving.errors import Code, ServingError
from pyserving.runtimes.registry import RuntimeOptions
from pyserving.runtimes.servable import DEFAULT_SIGNATURE, PREDICT_METHOD

__all__ = ["TFLITE_FILE", "TfLiteServable", "load", "signature_defs"]

TFLITE_FILE = "model.tflite"
# The model metadata entry that holds a flexbuffer map: signature key -> serialized SignatureDef.
_SIGNATURE_METADATA = b"signature_defs_metadata"
# TF Serving's kInitialBatchSize: with several interpreters per pool, a request is cut into
# mini-batches of ceil(500 / interpreters per pool) rows.
_INITIAL_BATCH_SIZE = 500
# The most dimensions an input may have beyond its tensor's own: LiteRT's kernels take up to 6 (more fail,
# and from 11 on allocating the tensors crashes the process in the XNNPACK delegate, LiteRT 2.3.0).
_MAX_RANK = 6


def load(path: str, options: RuntimeOptions) -> TfLiteServable:
    """The registry's entry point: a version folder's `model.tflite` as a servable."""
    with open(os.path.join(path, TFLITE_FILE), "rb") as file:
        content = file.read()
    per_pool = max(1, options.num_tflite_interpreters_per_pool)
    return TfLiteServable(content, max(1, options.num_tflite_pools) * per_pool, per_pool)


def signature_defs(path: str, options: RuntimeOptions) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The registry's reader for tools: the signatures a version folder's `model.tflite` is served with."""
    with open(os.path.join(path, TFLITE_FILE), "rb") as file:
        content = file.read()
    interpreter = _interpreter(content)
    return _signatures(content, interpreter)[0]


@dataclass(frozen=True)
class _Binding:
    """How one signature runs: through a signature runner (by its key), or on the primary subgraph."""

    runner_key: str | None
    inputs: dict[str, int]  # alias -> tensor index in the primary subgraph (unused with a runner)
    outputs: dict[str, int]
    dtypes: dict[str, int]  # input alias -> the tensor's DataType
    ranks: dict[str, int] = field(default_factory=dict)  # input alias -> the most dimensions it may have


class _Slot:
    """One interpreter with its signature runners; used by one call at a time."""

    def __init__(self, content: bytes, runner_keys: Sequence[str]) -> None:
        self.interpreter = _interpreter(content)
        self.runners = {key: self.interpreter.get_signature_runner(key) for key in runner_keys}
        # The primary subgraph's input shapes as last set: a call resizes only when they change.
        self.shapes = {d["index"]: tuple(d["shape"]) for d in self.interpreter.get_input_details()}


def _interpreter(content: bytes) -> Any:
    """An interpreter with its tensors allocated; the load fails here on a bad file or an op it lacks."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ServingError(
            Code.FAILED_PRECONDITION,
            "Serving model.tflite needs the TFLite interpreter: pip install 'pyserving[tflite]'",
        ) from None
    if not content:
        raise ServingError(Code.INVALID_ARGUMENT, "Cannot build FlatBufferModel from buffer: the file is empty")
    try:
        interpreter = Interpreter(model_content=content, num_threads=1)
    except (ValueError, RuntimeError) as exc:
        raise ServingError(Code.INVALID_ARGUMENT, f"Cannot build FlatBufferModel from buffer: {_text(exc)}") from None
    try:
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        text = _text(exc)
        if "unresolved custom op" in text:
            # TF Serving links TF Lite's ParseExample kernels in; the Python interpreter has built-in ops only.
            text += " pyserving's TFLite interpreter (ai-edge-litert) has LiteRT's built-in ops only."
        raise ServingError(Code.INTERNAL, f"Failed to allocate tensors: {text}") from None
    return interpreter


def _text(exc: BaseException) -> str:
    """LiteRT's error text on one line (it adds a help link on a line of its own)."""
    return " ".join(str(exc).split())


class TfLiteServable:
    """A `model.tflite` loaded into a pool of interpreters."""

    runtime = "TF1"  # TF Serving's runtime_latency label: it serves TFLite through a Session too

    def __init__(self, content: bytes, interpreters: int, per_pool: int) -> None:
        first = _interpreter(content)
        self._signature_defs, self._bindings = _signatures(content, first)
        runner_keys = sorted({b.runner_key for b in self._bindings.values() if b.runner_key is not None})
        self._pool = _Pool([_Slot(content, runner_keys) for _ in range(interpreters)])
        self._split_rows = 0
        self._splitter: ThreadPoolExecutor | None = None
        if per_pool > 1:
            model_batch = _model_batch_size(first)
            self._split_rows = model_batch if model_batch > 1 else -(-_INITIAL_BATCH_SIZE // per_pool)
            self._splitter = ThreadPoolExecutor(interpreters, thread_name_prefix="tflite-split")

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        binding = self._bindings[signature_name]
        feeds = _checked(binding, inputs)
        rows = _rows(feeds)
        if self._splitter is None or rows is None or rows <= self._split_rows:
            return self._run_one(binding, feeds, output_aliases)
        step = self._split_rows
        parts = [{a: v[start : start + step] for a, v in feeds.items()} for start in range(0, rows, step)]
        results = list(self._splitter.map(lambda part: self._run_one(binding, part, output_aliases), parts))
        batch_major = all(
            r[i].ndim > 0 and r[i].shape[0] == _rows(part)
            for part, r in zip(parts, results, strict=True)
            for i in range(len(output_aliases))
        )
        if not batch_major:  # an output that is not one row per input row cannot be joined: run it whole
            return self._run_one(binding, feeds, output_aliases)
        return [np.concatenate([r[i] for r in results]) for i in range(len(output_aliases))]

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        return [self.run(name, inputs, aliases, timeout_ms) for name, aliases in tasks]

    def _run_one(self, binding: _Binding, feeds: dict[str, np.ndarray], aliases: Sequence[str]) -> list[np.ndarray]:
        slot = self._pool.take()
        try:
            try:
                if binding.runner_key is not None:
                    results = slot.runners[binding.runner_key](**feeds)
                    return [_output(results[a]) for a in aliases]
                interpreter = slot.interpreter
                resized = False
                for alias, value in feeds.items():
                    index = binding.inputs[alias]
                    if slot.shapes.get(index) != value.shape:
                        slot.shapes.pop(index, None)  # unknown until the resize succeeds
                        interpreter.resize_tensor_input(index, value.shape)
                        slot.shapes[index] = value.shape
                        resized = True
                if resized:
                    interpreter.allocate_tensors()
                for alias, value in feeds.items():
                    interpreter.set_tensor(binding.inputs[alias], value)
                interpreter.invoke()
                return [_output(interpreter.get_tensor(binding.outputs[a])) for a in aliases]
            except (ValueError, RuntimeError) as exc:
                slot.shapes.clear()  # a failed resize or allocation: the next call resizes and allocates again
                raise ServingError(Code.INVALID_ARGUMENT, f"TFLite interpreter: {_text(exc)}") from None
        finally:
            self._pool.give(slot)

    def close(self) -> None:
        if self._splitter is not None:
            self._splitter.shutdown(wait=False)
        self._pool.clear()


class _Pool:
    """Free interpreters. Taking one when some are free is a deque pop (queue.Queue's locks cost ~5 us
    a call, as much as invoking a small model); a caller finding none waits to be told of a return."""

    def __init__(self, slots: list[_Slot]) -> None:
        self._free = deque(slots)
        self._returned = threading.Condition()
        self._waiting = 0

    def take(self) -> _Slot:
        try:
            return self._free.pop()
        except IndexError:
            pass
        with self._returned:
            self._waiting += 1  # before the check, so a `give` after it sees a waiter and notifies
            try:
                while not self._free:
                    self._returned.wait()
                return self._free.pop()
            finally:
                self._waiting -= 1

    def give(self, slot: _Slot) -> None:
        self._free.append(slot)
        if self._waiting:
            with self._returned:
                self._returned.notify()

    def clear(self) -> None:
        self._free.clear()


def _checked(binding: _Binding, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs, if each has its tensor's type: the interpreter would reinterpret or reject the bytes."""
    for alias, value in inputs.items():
        if value.ndim > binding.ranks[alias]:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Input {alias} has {value.ndim} dimensions; the TFLite model takes at most {binding.ranks[alias]}",
            )
        want, got = binding.dtypes[alias], tensors.dtype_of(value)
        if want != got:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Input {alias} expects {tensors.type_name(want)} but {tensors.type_name(got)} is provided",
            )
    return inputs


def _rows(feeds: dict[str, np.ndarray]) -> int | None:
    """The common first dimension of the inputs (None if they have none)."""
    sizes = {value.shape[0] if value.ndim else None for value in feeds.values()}
    size = sizes.pop() if len(sizes) == 1 else None
    return size


def _output(array: np.ndarray) -> np.ndarray:
    """Strings as object arrays of bytes, as every other runtime returns them."""
    return array.astype(object) if array.dtype.kind == "S" else array


def _model_batch_size(interpreter: Any) -> int:
    """TF Serving's GetModelBatchSize: the first dimension of the only input, else -1."""
    details = interpreter.get_input_details()
    if len(details) != 1 or not len(details[0]["shape_signature"]):
        return -1
    return int(details[0]["shape_signature"][0])


_Tensor = tuple[meta_graph_pb2.TensorInfo, int, int]  # (TensorInfo, tensor index, DataType)


def _signatures(content: bytes, interpreter: Any) -> tuple[dict[str, meta_graph_pb2.SignatureDef], dict[str, _Binding]]:
    """TF Serving's signatures for the model (see the module's docstring) and how each one runs."""
    inputs = _tensor_map(interpreter.get_input_details(), "Input")
    outputs = _tensor_map(interpreter.get_output_details(), "Output")
    embedded = _embedded_signature_defs(content)
    defs: dict[str, meta_graph_pb2.SignatureDef] = {}
    bindings: dict[str, _Binding] = {}
    if embedded:
        for key, signature in embedded.items():
            for kind, tensors_by_name, infos in (
                ("input", inputs, signature.inputs),
                ("output", outputs, signature.outputs),
            ):
                for alias, info in infos.items():
                    info.name = _fixed_name(tensors_by_name, info.name, f"Signature {kind} {alias}")
            defs[key] = signature
            bindings[key] = _Binding(
                None,
                {a: inputs[i.name][1] for a, i in signature.inputs.items()},
                {a: outputs[i.name][1] for a, i in signature.outputs.items()},
                {a: inputs[i.name][2] for a, i in signature.inputs.items()},
            )
    elif interpreter.get_signature_list():
        for key in interpreter.get_signature_list():
            runner = interpreter.get_signature_runner(key)
            signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
            dtypes = {}
            for alias, details in runner.get_input_details().items():
                info, _, dtype = _tensor(details)
                signature.inputs[alias].CopyFrom(info)
                dtypes[alias] = dtype
            for alias, details in runner.get_output_details().items():
                signature.outputs[alias].CopyFrom(_tensor(details)[0])
            defs[key] = signature
            bindings[key] = _Binding(key, {}, {}, dtypes)
    else:
        signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
        for name, (info, _, _) in inputs.items():
            signature.inputs[_legacy_name(name)].CopyFrom(info)
        for name, (info, _, _) in outputs.items():
            signature.outputs[_legacy_name(name)].CopyFrom(info)
        defs[DEFAULT_SIGNATURE] = signature
        bindings[DEFAULT_SIGNATURE] = _Binding(
            None,
            {_legacy_name(n): t[1] for n, t in inputs.items()},
            {_legacy_name(n): t[1] for n, t in outputs.items()},
            {_legacy_name(n): t[2] for n, t in inputs.items()},
        )
    for key, binding in bindings.items():
        binding.ranks.update({a: max(_MAX_RANK, len(i.tensor_shape.dim)) for a, i in defs[key].inputs.items()})
    return defs, bindings


def _tensor(details: dict) -> _Tensor:
    """A tensor's TensorInfo (its name, type and current dimensions), index and DataType."""
    dtype = np.dtype(details["dtype"])
    try:
        data_type = tensors.dtype_of(np.empty(0, dtype))
    except ServingError:
        raise ServingError(Code.INTERNAL, f"Unknown TfLite type: {dtype} (tensor {details['name']})") from None
    shape = tensor_shape_pb2.TensorShapeProto(dim=[{"size": int(d)} for d in details["shape"]])
    return (
        meta_graph_pb2.TensorInfo(name=details["name"], dtype=data_type, tensor_shape=shape),
        details["index"],
        data_type,
    )


def _tensor_map(details: list[dict], kind: str) -> dict[str, _Tensor]:
    """Tensor name -> tensor, for the primary subgraph's inputs or outputs."""
    found: dict[str, _Tensor] = {}
    for entry in details:
        if not entry["name"]:
            raise ServingError(Code.INTERNAL, f"{kind} name missing for tensor index: {entry['index']}")
        if entry["name"] in found:
            raise ServingError(Code.ALREADY_EXISTS, f"{kind} tensor name: {entry['name']} has multiple indices")
        found[entry["name"]] = _tensor(entry)
    return found


def _legacy_name(name: str) -> str:
    """A TF tensor name without its `:N` suffix, as early TFLite converters wrote names."""
    return name.split(":", 1)[0]


def _fixed_name(tensors_by_name: dict[str, _Tensor], name: str, context: str) -> str:
    """A signature's tensor name as the model spells it (`x:0` may be `x`); fails the load if neither exists."""
    if name in tensors_by_name:
        return name
    if _legacy_name(name) in tensors_by_name:
        return _legacy_name(name)
    raise ServingError(Code.INTERNAL, f"{context} references an unknown tensor: Unknown tensor '{name}'.")


def _embedded_signature_defs(content: bytes) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs in the model's `signature_defs_metadata` entry (a flexbuffer map), if it has one."""
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    try:
        model = schema.Model.GetRootAs(content, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() != _SIGNATURE_METADATA:
                continue
            buffer = model.Buffers(entry.Buffer())
            if buffer.DataLength():
                data = buffer.DataAsNumpy().tobytes()
            else:  # a large model keeps buffers after the flatbuffer
                data = content[buffer.Offset() : buffer.Offset() + buffer.Size()]
            root = flexbuffers.GetRoot(data).AsMap
            found = {}
            for key, value in zip(root.Keys, root.Values, strict=True):
                signature = meta_graph_pb2.SignatureDef()
                signature.ParseFromString(bytes(value.AsStringBytes if value.IsString else value.AsBlob))
                found[key.AsKey] = signature
            return found
    except Exception as exc:  # any malformed flatbuffer, flexbuffer or proto
        raise ServingError(Code.INVALID_ARGUMENT, f"Invalid SignatureDefs found in TfLite model: {exc}") from None
    return {}

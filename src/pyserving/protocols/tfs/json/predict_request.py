"""REST predict bodies to numpy tensors, with TF Serving's rules and error messages (json_tensor.cc).

Decoding has three paths. Bodies of 4 KiB and more whose tensors are regular
numeric arrays come from simdjson straight into numpy (`numeric`). Otherwise
the fast path hands orjson's lists to numpy in one call and only checks the
resulting dtype and value range. Anything it cannot prove correct (ragged lists,
strings, base64, booleans, nulls, out-of-range numbers) goes through `_Filler`,
a faithful walk that reproduces TF Serving's shape inference and its exact error
messages. All paths give the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving import tensors
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.protocols.tfs.json import numeric
from pyserving.protocols.tfs.json.document import debug_string, decode_b64, is_b64, json_type, parse_object

__all__ = ["COLUMNAR", "ROW", "PredictInputs", "decode_predict", "parse_predict"]

ROW = "row"
COLUMNAR = "columnar"
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)
_INT_RANGES = {
    types_pb2.DT_INT32: _INT32,
    types_pb2.DT_INT16: _INT32,
    types_pb2.DT_INT8: _INT32,
    types_pb2.DT_UINT8: _INT32,
    types_pb2.DT_INT64: _INT64,
    types_pb2.DT_UINT32: _UINT32,
    types_pb2.DT_UINT64: _UINT64,
}
_FLOATS = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE)
# A signature's inputs: alias -> TensorInfo.
_Infos = dict[str, Any]

# TensorFlow's limit on a tensor's rank. TF Serving builds a TensorProto of any depth from JSON;
# Tensor::FromProto then refuses it ("tensor parsing error"), after every input was decoded.
_MAX_RANK = 64

# Below this, orjson's Python objects cost less than simdjson's fixed overhead (measured crossover 2-5 KiB).
_NUMERIC_PARSE_BYTES = 4096


def parse_predict(body: bytes) -> dict[str, Any]:
    """`parse_object` for a predict body; the tensors of a larger one come back as numpy arrays when
    `numeric` can prove them regular and numeric, else as lists."""
    if len(body) >= _NUMERIC_PARSE_BYTES:
        doc = numeric.parse(body)
        if doc is not None:
            return doc
    return parse_object(body)


def _type_error(value: Any, dtype: int) -> ServingError:
    return invalid_argument(
        f"JSON Value: {debug_string(value)} Type: {json_type(value)} is not of expected type: "
        f"{tensors.type_name(dtype)}"
    )


def _check_scalar(value: Any, dtype: int) -> Any:
    """One leaf value, converted the way TF's AddValueToTensor accepts it."""
    if dtype == types_pb2.DT_STRING:
        if isinstance(value, dict):
            return decode_b64(value)
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, dict):
        raise _type_error(value, dtype)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype in _FLOATS:
        if not is_number:
            raise _type_error(value, dtype)
        return float(value)
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    bounds = _INT_RANGES.get(dtype)
    if bounds is None:
        raise ServingError(
            Code.UNIMPLEMENTED, f"Conversion of JSON Value: {debug_string(value)} to type: {tensors.type_name(dtype)}"
        )
    if not (isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]):
        raise _type_error(value, dtype)
    return value


def _dense_shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


class _Filler:
    """TF's FillTensorProto: walk a JSON value against the shape inferred from its first elements."""

    def __init__(self, dtype: int, shape: list[int]) -> None:
        self.dtype = dtype
        self.shape = shape
        self.values: list[Any] = []

    def fill(self, value: Any) -> None:
        """Depth first in document order, without recursion (lists may nest 1,000 deep)."""
        rank = len(self.shape)
        pending: list[tuple[Any, int]] = [(value, 0)]
        while pending:
            value, level = pending.pop()
            if not isinstance(value, list):
                if level != rank:
                    raise invalid_argument(
                        f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} "
                        f"in the JSON DOM. Expected at level: {rank}"
                    )
                self.values.append(_check_scalar(value, self.dtype))
                continue
            if level >= rank:
                raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
            if len(value) != self.shape[level]:
                raise invalid_argument(
                    f"Encountered list at unexpected size: {len(value)} at level: {level} "
                    f"expected size: {self.shape[level]}"
                )
            pending.extend((item, level + 1) for item in reversed(value))

    def array(self) -> np.ndarray:
        np_dtype = tensors.numpy_dtype(self.dtype)
        if self.dtype == types_pb2.DT_STRING:
            flat = np.empty(len(self.values), dtype=object)
            flat[:] = self.values
        elif self.dtype in _INT_RANGES and np_dtype.itemsize < 4:
            flat = np.array(self.values, dtype=np.int64).astype(np_dtype)  # TF narrows int_val by casting
        else:
            flat = np.array(self.values, dtype=np_dtype)
        return flat.reshape(self.shape)


class _NeedsLists(Exception):
    """An array from `numeric` that only the slow path can judge: decode the lists instead."""


class _TooManyDimensions(Exception):
    """A tensor that decoded but has more than `_MAX_RANK` dimensions."""


def _parsing_error(name: str) -> ServingError:
    return invalid_argument(f"tensor parsing error: {name}")


def _fast_tensor(value: Any, dtype: int, may_hold_bools: bool) -> np.ndarray | None:
    """numpy's own conversion when the result provably equals TF's; None to take the slow path."""
    if dtype == types_pb2.DT_STRING or (may_hold_bools and dtype != types_pb2.DT_BOOL):
        return None
    if isinstance(value, np.ndarray):
        array = value
    else:
        try:
            array = np.array(value)
        except (ValueError, TypeError, OverflowError):
            return None
    kind = array.dtype.kind
    if array.size == 0:
        return None
    if dtype == types_pb2.DT_BOOL:
        return array if kind == "b" else None
    if dtype in _FLOATS:
        if kind not in "if":
            return None
        return array.astype(tensors.numpy_dtype(dtype), copy=False)
    bounds = _INT_RANGES.get(dtype)
    if bounds is None or kind not in "iu":
        return None
    if array.min() < bounds[0] or array.max() > bounds[1]:
        return None
    return array.astype(tensors.numpy_dtype(dtype))


def _to_tensor(value: Any, dtype: int, may_hold_bools: bool) -> np.ndarray:
    array = _fast_tensor(value, dtype, may_hold_bools)
    if array is not None:
        return array
    if isinstance(value, np.ndarray):
        raise _NeedsLists()
    filler = _Filler(dtype, _dense_shape(value))
    filler.fill(value)
    if len(filler.shape) > _MAX_RANK:
        raise _TooManyDimensions()
    return filler.array()


@dataclass
class PredictInputs:
    tensors: dict[str, np.ndarray]
    format: str


def decode_predict(
    doc: dict[str, Any], signature: meta_graph_pb2.SignatureDef, signature_key: str, body: bytes
) -> PredictInputs:
    """Build input tensors from a predict request (`instances` or `inputs`) parsed by `parse_predict`."""
    try:
        return _decode_predict(doc, signature, signature_key, body)
    except _NeedsLists:
        return _decode_predict(parse_object(body), signature, signature_key, body)


def _decode_predict(
    doc: dict[str, Any], signature: meta_graph_pb2.SignatureDef, signature_key: str, body: bytes
) -> PredictInputs:
    # A plain dict: request keys may hold lone surrogates (invalid UTF-8), which a proto map rejects.
    infos = dict(signature.inputs)
    if not infos:
        raise invalid_argument(f"Failed to get input map for signature: {signature_key or 'DEFAULT'}")
    # Booleans would turn numpy's result into 0/1 numbers; `numeric`'s arrays hold none.
    may_hold_bools = not _numeric_arrays(doc) and (b"true" in body or b"false" in body)
    has_instances = "instances" in doc
    if has_instances and "inputs" in doc:
        raise invalid_argument(
            f"JSON Value: {debug_string(doc)} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist "
        )
    if has_instances:
        instances = doc["instances"]
        if not isinstance(instances, (list, np.ndarray)):
            raise invalid_argument(f"JSON Value: {debug_string(doc)} Expecting 'instances' to be an list/array")
        if len(instances) == 0:
            raise invalid_argument(f"JSON Value: {debug_string(doc)} No values in 'instances' array")
        return PredictInputs(_from_instances(instances, infos, may_hold_bools), ROW)
    if "inputs" in doc:
        return PredictInputs(_from_inputs(doc["inputs"], infos, may_hold_bools), COLUMNAR)
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _numeric_arrays(doc: dict[str, Any]) -> bool:
    """Whether the tensors came from `numeric`."""
    value = doc.get("instances", doc.get("inputs"))
    return isinstance(value, np.ndarray) or (
        isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values())
    )


def _first_input(infos: _Infos) -> str:
    return next(iter(infos))


def _from_inputs(value: Any, infos: _Infos, may_hold_bools: bool) -> dict[str, np.ndarray]:
    if not isinstance(value, dict) or is_b64(value):
        if len(infos) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        name = _first_input(infos)
        try:
            return {name: _to_tensor(value, infos[name].dtype, may_hold_bools)}
        except _TooManyDimensions:
            raise _parsing_error(name) from None
    result = {}
    too_deep = []
    for name in sorted(infos):
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        try:
            result[name] = _to_tensor(value[name], infos[name].dtype, may_hold_bools)
        except _TooManyDimensions:
            too_deep.append(name)
    if too_deep:
        raise _parsing_error(too_deep[0])
    return result


def _is_element_object(value: Any) -> bool:
    return isinstance(value, dict) and not is_b64(value)


def _from_instances(instances: Any, infos: _Infos, may_hold_bools: bool) -> dict[str, np.ndarray]:
    objects = _is_element_object(instances[0])
    if not isinstance(instances[0], dict) and len(infos) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    names = sorted(infos)
    if objects:
        if all(type(e) is dict and len(e) == len(names) and all(n in e for n in names) for e in instances):
            fast = {}
            for name in names:
                array = _fast_tensor([e[name] for e in instances], infos[name].dtype, may_hold_bools)
                if array is None:
                    break
                fast[name] = array
            else:
                return fast
        return _instances_slow(instances, infos, names, objects=True)
    if len(infos) == 1:
        name = names[0]
        array = _fast_tensor(instances, infos[name].dtype, may_hold_bools)
        if array is not None:
            return {name: array}
    if isinstance(instances, np.ndarray):
        raise _NeedsLists()
    return _instances_slow(instances, infos, names, objects=False)


def _instances_slow(instances: Any, infos: _Infos, names: list[str], objects: bool) -> dict[str, np.ndarray]:
    rows: dict[str, list[np.ndarray]] = {}
    shapes: dict[str, tuple[int, list[int]]] = {}
    too_deep: set[str] = set()  # stacked, more than _MAX_RANK dimensions

    def add(item: Any, name: str) -> None:
        if name not in infos:
            raise invalid_argument(f"JSON object: does not have named input: {name}")
        shape = _dense_shape(item)
        filler = _Filler(infos[name].dtype, shape)
        filler.fill(item)
        size = len(filler.values)
        if name not in shapes:
            shapes[name] = (size, shape)
        elif shapes[name][0] != size:
            raise invalid_argument(f"Expecting tensor size: {shapes[name][0]} but got: {size}")
        elif shapes[name][1] != shape:
            raise invalid_argument(f"Expecting shape {_shape_text(shapes[name][1])} but got: {_shape_text(shape)}")
        if len(shape) + 1 > _MAX_RANK:
            too_deep.add(name)
        else:
            rows.setdefault(name, []).append(filler.array())

    for index, element in enumerate(instances):
        if objects:
            if not _is_element_object(element):
                raise invalid_argument(f"Expecting object but got list at item {index} of input list")
            for key, item in element.items():
                try:
                    add(item, key)
                except ServingError as exc:
                    raise invalid_argument(
                        f"Failed to process element: {index} key: {key} of 'instances' list. Error: {exc}"
                    ) from None
            if sorted(element) != names:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{debug_string(element)} keys must be equal to: {','.join(names)}"
                )
        else:
            if _is_element_object(element):
                raise invalid_argument(f"Expecting value/list but got object at item {index} of input list")
            try:
                add(element, names[0])
            except ServingError as exc:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. Error: {exc}"
                ) from None
    if too_deep:
        raise _parsing_error(min(too_deep))
    return {name: np.stack(parts) for name, parts in rows.items()}


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"

"""REST JSON <-> numpy tensors, with TF Serving's rules and error messages (json_tensor.cc).

Decoding has two paths. The fast path hands the parsed lists to numpy in one
call and only checks the resulting dtype and value range. Anything it cannot
prove correct (ragged lists, strings, base64, booleans, nulls, out-of-range
numbers) goes through `_Filler`, a faithful walk that reproduces TF Serving's
shape inference and its exact error messages. Both paths give the same tensor.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import orjson
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving import json_numeric, tensors
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.json_writer import (
    CsvRun, PrettyWriter, b64_object, bytes_string, format_double, format_float32, format_floats, json_string,
)

ROW = "row"
COLUMNAR = "columnar"
_DEBUG_LIMIT = 256
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)
_INT_RANGES = {
    types_pb2.DT_INT32: _INT32, types_pb2.DT_INT16: _INT32, types_pb2.DT_INT8: _INT32,
    types_pb2.DT_UINT8: _INT32, types_pb2.DT_INT64: _INT64, types_pb2.DT_UINT32: _UINT32,
    types_pb2.DT_UINT64: _UINT64,
}
_FLOATS = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE)

# A JSON number beyond float32's range becomes +-inf, as in TF Serving. numpy warns about such a
# cast; the warning is noise here, and an np.errstate around each cast cost a microsecond per request.
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)


# ---------------------------------------------------------------- parsing

def parse_object(body: bytes) -> dict:
    """Parse a request body as TF Serving does: NaN/Infinity allowed, trailing data ignored.

    Known difference: rapidjson keeps the first of duplicate keys, both parsers here keep the last.
    """
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = _parse_lenient(body)
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {debug_string(doc)} Is not object")
    return doc


# Below this, orjson's Python objects cost less than simdjson's fixed overhead (measured crossover 2-5 KiB).
_NUMERIC_PARSE_BYTES = 4096


def parse_predict(body: bytes) -> dict:
    """`parse_object` for a predict body; the tensors of a larger one come back as numpy arrays when
    json_numeric can prove them regular and numeric, else as lists."""
    if len(body) >= _NUMERIC_PARSE_BYTES:
        doc = json_numeric.parse(body)
        if doc is not None:
            return doc
    return parse_object(body)


class _NumberTooBig(Exception):
    def __init__(self, token: str) -> None:
        self.token = token


def _finite_float(token: str) -> float:
    """A JSON number with a fraction or exponent; rapidjson refuses one beyond double range (1e400)."""
    value = float(token)
    if math.isinf(value):
        raise _NumberTooBig(token)
    return value


def _parse_lenient(body: bytes):
    text = body.decode("utf-8", "surrogateescape")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        return json.JSONDecoder(parse_float=_finite_float).raw_decode(text, start)[0]
    except json.JSONDecodeError as exc:
        offset = len(text[: exc.pos].encode("utf-8", "surrogateescape"))
        raise invalid_argument(f"JSON Parse error: {_rapidjson_error(exc, text)} at offset: {offset}") from None
    except _NumberTooBig as exc:
        offset = len(text[: text.find(exc.token)].encode("utf-8", "surrogateescape"))
        raise invalid_argument(f"JSON Parse error: Number too big to be stored in double. at offset: {offset}") \
            from None
    except RecursionError:
        raise invalid_argument("JSON Parse error: Terminate parsing due to Handler error. at offset: 0") from None


def _rapidjson_error(exc: json.JSONDecodeError, text: str) -> str:
    msg = exc.msg
    if not text[exc.pos:].strip() and not text.strip():
        return "The document is empty."
    if msg.startswith("Expecting value"):
        return "Invalid value."
    if msg.startswith("Expecting property name"):
        return "Missing a name for object member."
    if msg.startswith("Expecting ':'"):
        return "Missing a colon after a name of object member."
    if msg.startswith("Expecting ','"):
        return ("Missing a comma or ']' after an array element." if _innermost_open(text, exc.pos) == "["
                else "Missing a comma or '}' after an object member.")
    if msg.startswith("Unterminated string"):
        return "Missing a closing quotation mark in string."
    if msg.startswith("Invalid \\escape"):
        return "Invalid escape character in string."
    if msg.startswith("Invalid \\u") or msg.startswith("Invalid \\uXXXX"):
        return "Incorrect hex digit after \\u escape in string."
    if msg.startswith("Invalid control character"):
        return "Invalid encoding in string."
    return "Invalid value."


def _innermost_open(text: str, end: int) -> str:
    stack: list[str] = []
    in_string = escaped = False
    for ch in text[:end]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append(ch)
        elif ch in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else "{"


def signature_name(doc: dict) -> str:
    """The optional `signature_name`; must be a string."""
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(
            f"JSON Value: {debug_string(doc)} not formatted correctly. "
            "'signature_name' key must be a string value.")
    return name


# ------------------------------------------------------- debug rendering

def json_type(value) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _write_value(writer: PrettyWriter, value) -> None:
    if isinstance(value, dict):
        writer.start_object()
        for k, v in value.items():
            writer.key(k)
            _write_value(writer, v)
        writer.end_object()
    elif isinstance(value, list):
        writer.start_array()
        for v in value:
            _write_value(writer, v)
        writer.end_array()
    elif value is None:
        writer.raw("null")
    elif value is True or value is False:
        writer.raw("true" if value else "false")
    elif isinstance(value, int):
        writer.raw(str(value))
    elif isinstance(value, float):
        fits_float = not np.isfinite(value) or float(np.float32(value)) == value
        writer.raw(format_float32(value) if fits_float else format_double(value))
    else:
        writer.raw(json_string(value))


def debug_string(value) -> str:
    """TF's JsonValueToString: pretty JSON of a value, cut at 256 bytes."""
    writer = PrettyWriter()
    _write_value(writer, value)
    text = writer.getvalue()
    return text[:_DEBUG_LIMIT].decode("utf-8", "ignore")


def _type_error(value, dtype: int) -> ServingError:
    return invalid_argument(
        f"JSON Value: {debug_string(value)} Type: {json_type(value)} is not of expected type: "
        f"{tensors.type_name(dtype)}")


# ------------------------------------------------------------ decoding

def is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_b64(value) -> bytes:
    if not is_b64(value):
        raise invalid_argument(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    try:
        return base64.b64decode(value["b64"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise invalid_argument("Unable to base64 decode") from None


def _check_scalar(value, dtype: int):
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
        raise ServingError(Code.UNIMPLEMENTED,
                           f"Conversion of JSON Value: {debug_string(value)} to type: {tensors.type_name(dtype)}")
    if not (isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]):
        raise _type_error(value, dtype)
    return value


def _dense_shape(value) -> list[int]:
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
        self.values: list = []

    def fill(self, value, level: int = 0) -> None:
        rank = len(self.shape)
        if not isinstance(value, list):
            if level != rank:
                raise invalid_argument(
                    f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} "
                    f"in the JSON DOM. Expected at level: {rank}")
            self.values.append(_check_scalar(value, self.dtype))
            return
        if level >= rank:
            raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
        if len(value) != self.shape[level]:
            raise invalid_argument(
                f"Encountered list at unexpected size: {len(value)} at level: {level} "
                f"expected size: {self.shape[level]}")
        for item in value:
            self.fill(item, level + 1)

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
    """An array from json_numeric that only the slow path can judge: decode the lists instead."""


def _fast_tensor(value, dtype: int, may_hold_bools: bool) -> np.ndarray | None:
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


def _to_tensor(value, dtype: int, may_hold_bools: bool) -> np.ndarray:
    array = _fast_tensor(value, dtype, may_hold_bools)
    if array is not None:
        return array
    if isinstance(value, np.ndarray):
        raise _NeedsLists()
    filler = _Filler(dtype, _dense_shape(value))
    filler.fill(value)
    return filler.array()


@dataclass
class PredictInputs:
    tensors: dict[str, np.ndarray]
    format: str


def decode_predict(doc: dict, signature: meta_graph_pb2.SignatureDef, signature_key: str,
                   body: bytes) -> PredictInputs:
    """Build input tensors from a predict request (`instances` or `inputs`) parsed by `parse_predict`."""
    try:
        return _decode_predict(doc, signature, signature_key, body)
    except _NeedsLists:
        return _decode_predict(parse_object(body), signature, signature_key, body)


def _decode_predict(doc: dict, signature: meta_graph_pb2.SignatureDef, signature_key: str,
                    body: bytes) -> PredictInputs:
    # A plain dict: request keys may hold lone surrogates (invalid UTF-8), which a proto map rejects.
    infos = dict(signature.inputs)
    if not infos:
        raise invalid_argument(f"Failed to get input map for signature: {signature_key or 'DEFAULT'}")
    # Booleans would turn numpy's result into 0/1 numbers; json_numeric's arrays hold none.
    may_hold_bools = not _numeric_arrays(doc) and (b"true" in body or b"false" in body)
    has_instances = "instances" in doc
    if has_instances and "inputs" in doc:
        raise invalid_argument(
            f"JSON Value: {debug_string(doc)} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist ")
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


def _numeric_arrays(doc: dict) -> bool:
    """Whether the tensors came from json_numeric."""
    value = doc.get("instances", doc.get("inputs"))
    return isinstance(value, np.ndarray) or (
        isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()))


def _first_input(infos) -> str:
    return next(iter(infos))


def _from_inputs(value, infos, may_hold_bools: bool) -> dict[str, np.ndarray]:
    if not isinstance(value, dict) or is_b64(value):
        if len(infos) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map")
        name = _first_input(infos)
        return {name: _to_tensor(value, infos[name].dtype, may_hold_bools)}
    result = {}
    for name in sorted(infos):
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        result[name] = _to_tensor(value[name], infos[name].dtype, may_hold_bools)
    return result


def _is_element_object(value) -> bool:
    return isinstance(value, dict) and not is_b64(value)


def _from_instances(instances: list, infos, may_hold_bools: bool) -> dict[str, np.ndarray]:
    objects = _is_element_object(instances[0])
    if not isinstance(instances[0], dict) and len(infos) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map")
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


def _instances_slow(instances: list, infos, names: list[str], objects: bool) -> dict[str, np.ndarray]:
    rows: dict[str, list[np.ndarray]] = {}
    shapes: dict[str, tuple[int, list[int]]] = {}

    def add(item, name: str) -> None:
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
            raise invalid_argument(
                f"Expecting shape {_shape_text(shapes[name][1])} but got: {_shape_text(shape)}")
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
                        f"Failed to process element: {index} key: {key} of 'instances' list. "
                        f"Error: {exc}") from None
            if sorted(element) != names:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{debug_string(element)} keys must be equal to: {','.join(names)}")
        else:
            if _is_element_object(element):
                raise invalid_argument(f"Expecting value/list but got object at item {index} of input list")
            try:
                add(element, names[0])
            except ServingError as exc:
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. Error: {exc}") from None
    return {name: np.stack(parts) for name, parts in rows.items()}


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# ------------------------------------------------------------ encoding

def _leaves(array: np.ndarray, name: str) -> tuple[list, object]:
    """Flat leaf items of a tensor and the function that writes a run of them.

    Text leaves are written in bulk; `_bytes` string outputs become `{"b64": ...}` objects.
    """
    kind = array.dtype.kind
    flat = array.ravel()
    if array.dtype == object or kind in "SU":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in flat.tolist()]
        if name.endswith("_bytes"):
            return items, _write_b64_run
        return [bytes_string(v) for v in items], PrettyWriter.raw_run
    if array.dtype in (np.float32, np.float64):
        return format_floats(flat), PrettyWriter.raw_run
    if kind == "b":
        return ["true" if v else "false" for v in flat.tolist()], PrettyWriter.raw_run
    if kind in "iu" and array.dtype != np.uint16:
        return list(map(str, flat.tolist())), PrettyWriter.raw_run
    raise invalid_argument(
        f"Failed to write JSON value for tensor type: {tensors.type_name(tensors.dtype_of(array))}")


def _write_b64_run(writer: PrettyWriter, items: list[bytes]) -> None:
    for item in items:
        b64_object(item, writer)


def _write_nested(writer: PrettyWriter, items: list, shape: tuple[int, ...], write_run) -> None:
    """TF's AddTensorValues: nested arrays over `shape`, a bare value for a scalar."""
    if not shape:
        write_run(writer, items[:1])
        return
    writer.start_array()
    if len(shape) == 1:
        write_run(writer, items)
    else:
        step = len(items) // shape[0] if shape[0] else 0
        for i in range(shape[0]):
            _write_nested(writer, items[i * step:(i + 1) * step], shape[1:], write_run)
    writer.end_array()


# Roughly the JSON text of one tensor element (a float is about 10 characters and a separator).
_ENCODED_BYTES_PER_ELEMENT = 16


def encoded_size(outputs: dict[str, np.ndarray]) -> int:
    """An estimate of `encode_predict`'s output size, to decide where to run it."""
    return sum(array.size for array in outputs.values()) * _ENCODED_BYTES_PER_ELEMENT


def _one_output_rows(items: list[str] | CsvRun, shape: tuple[int, ...]) -> bytes:
    """`encode_predict`'s row layout for one output with text leaves, joined without the writer:
    each row a single-line array, the outer array closed on a line of its own."""
    if not shape[0]:
        return b'{\n    "predictions": []\n}'
    if len(shape) > 1:
        rows = ", ".join(_single_line_rows(list(items), shape))
    else:
        rows = items.joined(", ") if isinstance(items, CsvRun) else ", ".join(items)
    return ('{\n    "predictions": [' + rows + "\n    ]\n}").encode("utf-8", "surrogateescape")


def _single_line_rows(items: list[str], shape: tuple[int, ...]) -> list[str]:
    """The texts of the `shape[0]` sub-arrays of `items` (a flat C-order tensor), each on one line."""
    if len(shape) == 1:
        return items
    step = len(items) // shape[0] if shape[0] else 0
    return ["[" + ", ".join(_single_line_rows(items[i * step:(i + 1) * step], shape[1:])) + "]"
            for i in range(shape[0])]


def encode_predict(outputs: dict[str, np.ndarray], fmt: str) -> bytes:
    """The predict response body in TF Serving's layout (`predictions` or `outputs`)."""
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == ROW:
        batch = -1
        for name in names:
            array = outputs[name]
            if array.ndim == 0:
                raise invalid_argument(f"Tensor name: {name} has no shape information ")
            if batch >= 0 and array.shape[0] != batch:
                raise invalid_argument(
                    f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}")
            batch = array.shape[0]
        rows = []  # per output: (name, leaf items, run writer, row shape, leaves per row)
        for name in names:
            inner = outputs[name].shape[1:]
            rows.append((name, *_leaves(outputs[name], name), inner, math.prod(inner)))
        as_objects = len(names) > 1
        if not as_objects and rows[0][2] is PrettyWriter.raw_run:
            return _one_output_rows(rows[0][1], outputs[names[0]].shape)
    writer = PrettyWriter()
    writer.start_object()
    if fmt == ROW:
        writer.key("predictions")
        writer.start_array()
        for item in range(batch):  # several outputs (an object per row), or `_bytes` ones ({"b64": ...})
            if as_objects:
                writer.start_object()
            writer.single_line = True
            for name, items, write_run, inner, per_row in rows:
                if as_objects:
                    writer.key(name)
                _write_nested(writer, items[item * per_row:(item + 1) * per_row], inner, write_run)
            writer.single_line = False
            if as_objects:
                writer.end_object()
        writer.end_array()
    else:
        writer.key("outputs")
        as_objects = len(names) > 1
        if as_objects:
            writer.start_object()
        for name in names:
            if as_objects:
                writer.key(name)
            items, write_run = _leaves(outputs[name], name)
            _write_nested(writer, items, outputs[name].shape, write_run)
        if as_objects:
            writer.end_object()
    writer.end_object()
    return writer.getvalue()


def encode_error(message: str) -> bytes:
    writer = PrettyWriter()
    writer.start_object()
    writer.key("error")
    writer.raw(json_string(message))
    writer.end_object()
    return writer.getvalue()

"""TensorFlow Serving's own test models, exported at test time instead of read from shared/testdata.

Each ``export_*`` function writes the equivalent of one folder of TF Serving's test data
(``tensorflow_serving/servables/tensorflow/testdata`` and ``tensorflow_serving/batching/testdata``):
the same signature keys, method names, input/output aliases, dtypes, shapes and tensor names, and the
same results. TF1 models are graphs built through ``tf.compat.v1`` and written with
``tf.compat.v1.saved_model.Builder`` (ref variables restored from ``variables/``, assets, main op or
legacy init op as in the originals); the TF2 model is a ``tf.Module`` written with
``tf.saved_model.save``. Every export is staged in a hidden, non-numeric folder inside the base path
and renamed into place, so a server polling the base path never sees half a version.

``base`` is always the model base path (what ``--model_base_path`` names); the functions return it.
TensorFlow is imported on first use, so the text constants and metadata helpers cost nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__all__ = [
    "ASSET_FILE_CONTENTS",
    "BAD_MODEL_CONFIG_TEXT",
    "BATCHING_CONFIG_TEXT",
    "GOOD_MODEL_CONFIG_TEMPLATE",
    "MONITORING_CONFIG_TEXT",
    "export_bad_half_plus_two",
    "export_counter",
    "export_half_plus_three",
    "export_half_plus_two",
    "export_half_plus_two_tf2",
    "export_half_plus_two_versions",
    "export_matrix_half_plus_two",
    "export_testdata",
    "good_model_config_text",
    "half_plus_two_2_versions_metadata",
    "half_plus_two_model_metadata",
    "half_plus_two_tf2_metadata",
    "version_folder",
]

ASSET_FILE_CONTENTS = "asset-file-contents"
"""Contents of ``assets/foo.txt`` in the half_plus_two/three models."""

GOOD_MODEL_CONFIG_TEMPLATE = """\
model_config_list {
  config {
    name: "half_plus_two"
    base_path: "${TEST_HALF_PLUS_TWO_DIR}"
    model_platform: "tensorflow"
  }
  config {
    name: "half_plus_three"
    base_path: "${TEST_HALF_PLUS_THREE_DIR}"
    model_platform: "tensorflow"
  }
}
"""
"""A two-model ModelServerConfig with TF Serving's ``${...}`` placeholders for the base paths."""

BAD_MODEL_CONFIG_TEXT = "improperly formatted file"
"""Text that does not parse as a ModelServerConfig."""

BATCHING_CONFIG_TEXT = """\
max_batch_size { value: 128 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1000000 }
num_batch_threads { value: 8 }
"""
"""A BatchingParameters text proto (for ``--batching_parameters_file``)."""

MONITORING_CONFIG_TEXT = """\
prometheus_config {
  enable: true
  path: "/monitoring/prometheus/metrics"
}
"""
"""A MonitoringConfig text proto (for ``--monitoring_config_file``)."""

_SERVE = "serve"
_PREDICT = "tensorflow/serving/predict"
_CLASSIFY = "tensorflow/serving/classify"
_REGRESS = "tensorflow/serving/regress"
_ASSET_NAME = "foo.txt"


def good_model_config_text(half_plus_two_path: Path | str, half_plus_three_path: Path | str) -> str:
    """``GOOD_MODEL_CONFIG_TEMPLATE`` with both base paths filled in."""
    return GOOD_MODEL_CONFIG_TEMPLATE.replace("${TEST_HALF_PLUS_TWO_DIR}", str(half_plus_two_path)).replace(
        "${TEST_HALF_PLUS_THREE_DIR}", str(half_plus_three_path)
    )


def version_folder(version: int) -> str:
    """TF Serving's version folder name: zero-padded to 8 digits (123 -> "00000123")."""
    return f"{version:08d}"


# --------------------------------------------------------------------------------------------------
# Plumbing


def _tf() -> Any:
    import tensorflow as tf  # imported on first export only

    return tf


@contextlib.contextmanager
def _staged(base: Path, folder: str) -> Iterator[tuple[Path, Path]]:
    """Yield (scratch dir, path to export into); on success rename the export to base/folder."""
    base.mkdir(parents=True, exist_ok=True)
    target = base / folder
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    scratch = Path(tempfile.mkdtemp(prefix=f".staging-{folder}-", dir=base))
    try:
        export_dir = scratch / "export"
        yield scratch, export_dir
        export_dir.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _quiet_tf_logging() -> Iterator[None]:
    """Silence tf_logging's deprecation chatter for the duration (restores the previous level)."""
    logger = _tf().get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _tensor_info(tensor: Any, *, with_shape: bool = True) -> Any:
    """A TensorInfo for a graph tensor; ``with_shape=False`` leaves tensor_shape unset (as TF 1.0 did)."""
    from tensorflow.core.protobuf import meta_graph_pb2

    info = meta_graph_pb2.TensorInfo(name=tensor.name, dtype=tensor.dtype.as_datatype_enum)
    if with_shape:
        info.tensor_shape.CopyFrom(tensor.shape.as_proto())
    return info


def _signature(method: str, inputs: dict[str, Any], outputs: dict[str, Any], *, with_shape: bool = True) -> Any:
    """A SignatureDef from alias -> graph tensor maps."""
    from tensorflow.core.protobuf import meta_graph_pb2

    signature = meta_graph_pb2.SignatureDef(method_name=method)
    for alias, tensor in inputs.items():
        signature.inputs[alias].CopyFrom(_tensor_info(tensor, with_shape=with_shape))
    for alias, tensor in outputs.items():
        signature.outputs[alias].CopyFrom(_tensor_info(tensor, with_shape=with_shape))
    return signature


def _ref_variable(value: Any, name: str, **kwargs: Any) -> Any:
    """A TF1 ref variable (VariableV2), like the originals' (not a resource variable)."""
    return _tf().compat.v1.Variable(value, name=name, use_resource=False, **kwargs)


def _add_asset(tf: Any) -> Any:
    """Register assets/foo.txt the way the TF1 originals do; returns the main/legacy-init op.

    The asset path tensor holds a fixed placeholder path (the loader feeds the real one), which keeps
    saved_model.pb independent of where it was built; the file itself is written by _write_asset.
    """
    from google.protobuf import any_pb2
    from tensorflow.core.protobuf import meta_graph_pb2

    path = tf.constant(f"assets/{_ASSET_NAME}", name="Const")
    tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS, path)
    asset = any_pb2.Any()
    asset.Pack(meta_graph_pb2.AssetFileDef(tensor_info=meta_graph_pb2.TensorInfo(name=path.name), filename=_ASSET_NAME))
    tf.compat.v1.add_to_collection(tf.compat.v1.saved_model.constants.ASSETS_KEY, asset)
    # An init op with a visible effect (a variable outside the checkpoint, set by the op).
    filename = _ref_variable(_ASSET_NAME, "filename_tensor", collections=[])
    return tf.group(tf.compat.v1.assign(filename, _ASSET_NAME), name="group_deps")


def _write_asset(export_dir: Path) -> None:
    (export_dir / "assets").mkdir(exist_ok=True)
    (export_dir / "assets" / _ASSET_NAME).write_text(ASSET_FILE_CONTENTS)


def _save_tf1(export_dir: Path, build: Callable[[Any], tuple[dict[str, Any], Any, Any, bool]]) -> None:
    """Build a graph with ``build(tf) -> (signatures, main_op, legacy_init_op, has_asset)`` and save it."""
    tf = _tf()
    graph = tf.Graph()
    with graph.as_default(), _quiet_tf_logging():
        signatures, main_op, legacy_init_op, has_asset = build(tf)
        if legacy_init_op is not None:  # the Builder files both under main_op; older exports used this key
            tf.compat.v1.add_to_collection(tf.compat.v1.saved_model.constants.LEGACY_INIT_OP_KEY, legacy_init_op)
        init = tf.compat.v1.global_variables_initializer()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(init)
            builder = tf.compat.v1.saved_model.Builder(str(export_dir))
            builder.add_meta_graph_and_variables(session, [_SERVE], signature_def_map=signatures, main_op=main_op)
            builder.save()
    if has_asset:
        _write_asset(export_dir)


def _parse_x_x2(tf: Any, serialized: Any) -> dict[str, Any]:
    """TF2: float features x (required) and x2 (default 0), each [1] per example (ParseExampleV2)."""
    features = {
        "x": tf.io.FixedLenFeature([1], tf.float32),
        "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
    }
    return tf.io.parse_example(serialized, features)


def _parse_example_v1(tf: Any, serialized: Any, defaults: dict[str, list[float]]) -> dict[str, Any]:
    """TF1: the original ParseExample op (a vector of examples in, [-1, 1] floats out).

    ``defaults`` maps each float feature to its default, [] for a required feature.
    """
    with tf.compat.v1.name_scope("ParseExample"):
        keys = list(defaults)
        dense = tf.raw_ops.ParseExample(
            serialized=serialized,
            names=tf.constant([], tf.string, name="names"),
            sparse_keys=[],
            dense_keys=[tf.constant(key, name=f"dense_keys_{i}") for i, key in enumerate(keys)],
            dense_defaults=[tf.constant(defaults[key], tf.float32, shape=[len(defaults[key])]) for key in keys],
            sparse_types=[],
            dense_shapes=[[1]] * len(keys),
            name="ParseExample",
        ).dense_values
    return dict(zip(keys, dense, strict=True))


# --------------------------------------------------------------------------------------------------
# TF1 half_plus_two family


def _half_plus_two_graph(
    tf: Any, *, classify_x2_to_y3: bool, separate_x2_variables: bool, identity_outputs: bool
) -> dict[str, Any]:
    """The half_plus_two graph: tf_example -> parse -> x, x2; y = ax+b, y2 = ax+c, y3 = a x2 + c."""
    a = _ref_variable(0.5, "a")
    b = _ref_variable(2.0, "b")
    c = _ref_variable(3.0, "c")
    serialized = tf.compat.v1.placeholder(tf.string, name="tf_example")
    parsed = _parse_example_v1(tf, serialized, {"x": [], "x2": [0.0]})
    x = tf.identity(parsed["x"], name="x")
    if identity_outputs:  # the 1.14 export wraps each output in an Identity; the 1.1 one names the Add
        y = tf.identity(a * x + b, name="y")
        y2 = tf.identity(a * x + c, name="y2")
    else:
        y = tf.add(a * x, b, name="y")
        y2 = tf.add(a * x, c, name="y2")
    x2 = tf.identity(parsed["x2"], name="x2")
    if separate_x2_variables:
        a2, c2 = _ref_variable(0.5, "a2"), _ref_variable(3.0, "c2")
        y3 = tf.identity(a2 * x2 + c2, name="y3")
    else:
        y3 = tf.add(a * x2, c, name="y3")
    signatures = {
        "serving_default": _signature(_PREDICT, {"x": x}, {"y": y}),
        "classify_x_to_y": _signature(_CLASSIFY, {"inputs": serialized}, {"scores": y}),
        "regress_x_to_y": _signature(_REGRESS, {"inputs": serialized}, {"outputs": y}),
        "regress_x_to_y2": _signature(_REGRESS, {"inputs": serialized}, {"outputs": y2}),
        "regress_x2_to_y3": _signature(_REGRESS, {"inputs": x2}, {"outputs": y3}),
    }
    if classify_x2_to_y3:
        signatures["classify_x2_to_y3"] = _signature(_CLASSIFY, {"inputs": x2}, {"scores": y3})
    return signatures


def export_half_plus_two(base: Path, version: int = 123, *, folder_name: str | None = None) -> Path:
    """saved_model_half_plus_two_cpu/00000123: TF1 half_plus_two (TF 1.14-style export).

    Signatures serving_default (x [-1,1] -> y = 0.5x + 2), classify_x_to_y, regress_x_to_y,
    regress_x_to_y2 (0.5x + 3) on serialized tf.Example (features x, x2), regress_x2_to_y3 (float x2
    [-1,1] -> 0.5x2 + 3). Variables a, b, c, a2, c2; assets/foo.txt; a ``saved_model_main_op``.
    Writes base/<folder_name or zero-padded version>; returns base.
    """
    base = Path(base)

    def build(tf: Any) -> tuple[dict[str, Any], Any, Any, bool]:
        signatures = _half_plus_two_graph(
            tf, classify_x2_to_y3=False, separate_x2_variables=True, identity_outputs=True
        )
        return signatures, _add_asset(tf), None, True

    with _staged(base, folder_name or version_folder(version)) as (_, export_dir):
        _save_tf1(export_dir, build)
    return base


def export_half_plus_two_versions(base: Path, versions: tuple[int, ...] = (123, 124)) -> Path:
    """saved_model_half_plus_two_2_versions: the same TF1 model as 00000123 and 00000124.

    Like export_half_plus_two plus classify_x2_to_y3 (float x2 -> scores 0.5x2 + 3), variables a, b, c
    only, and the init op under the older ``legacy_init_op`` collection key. Returns base.
    """
    base = Path(base)

    def build(tf: Any) -> tuple[dict[str, Any], Any, Any, bool]:
        signatures = _half_plus_two_graph(
            tf, classify_x2_to_y3=True, separate_x2_variables=False, identity_outputs=False
        )
        return signatures, None, _add_asset(tf), True

    for version in versions:
        with _staged(base, version_folder(version)) as (_, export_dir):
            _save_tf1(export_dir, build)
    return base


def export_half_plus_three(base: Path, version: int = 123) -> Path:
    """saved_model_half_plus_three/00000123: TF1 y = 0.5x + 3 (TF 1.0-style export).

    serving_default (x -> y) and ``tensorflow/serving/regress`` (tf_example -> outputs, a regress
    signature on serialized tf.Example with float feature x); no shapes recorded in the signatures,
    as TF 1.0 wrote them, and the regress input declared DT_FLOAT though the tensor is a string (as in
    the original). Variables a=0.5, b=3, c=3; assets/foo.txt; ``legacy_init_op``. Returns base.
    """
    base = Path(base)

    def build(tf: Any) -> tuple[dict[str, Any], Any, Any, bool]:
        a, b, c = _ref_variable(0.5, "a"), _ref_variable(3.0, "b"), _ref_variable(3.0, "c")
        serialized = tf.compat.v1.placeholder(tf.string, name="tf_example")
        parsed = _parse_example_v1(tf, serialized, {"x": []})
        x = tf.identity(parsed["x"], name="x")
        y = tf.add(a * x, b, name="y")
        x2 = tf.compat.v1.placeholder(tf.float32, name="x2")
        tf.add(a * x2, c, name="y2")  # in the original graph too, though no signature reads it
        legacy_init_op = _add_asset(tf)
        outputs = tf.identity(y, name="Identity")
        signatures = {
            "serving_default": _signature(_PREDICT, {"x": x}, {"y": y}, with_shape=False),
            _REGRESS: _signature(_REGRESS, {"inputs": serialized}, {"outputs": outputs}, with_shape=False),
        }
        # The original declares this string input as DT_FLOAT (a quirk of its generator); keep it.
        signatures[_REGRESS].inputs["inputs"].dtype = tf.float32.as_datatype_enum
        return signatures, None, legacy_init_op, True

    with _staged(base, version_folder(version)) as (_, export_dir):
        _save_tf1(export_dir, build)
    return base


def export_counter(base: Path, version: int = 123) -> Path:
    """saved_model_counter/00000123: a stateful TF1 model around one float ref variable ``counter``.

    get_counter -> the counter; incr_counter -> counter += 1, then its value; incr_counter_by (delta, a
    float scalar) -> counter += delta, then its value; reset_counter -> counter = 0, then 0. No inputs
    except delta; every output is ``output`` of dtype DT_FLOAT_REF, shape []. Starts at 0. Returns base.
    """
    base = Path(base)

    def build(tf: Any) -> tuple[dict[str, Any], Any, Any, bool]:
        counter = _ref_variable(0.0, "counter")
        with tf.compat.v1.name_scope("incr_counter_op"):
            incr = tf.compat.v1.assign_add(counter, 1.0)
        delta = tf.compat.v1.placeholder(tf.float32, name="delta")
        with tf.compat.v1.name_scope("incr_counter_by_op"):
            incr_by = tf.compat.v1.assign_add(counter, delta)
        with tf.compat.v1.name_scope("reset_counter_op"):
            reset = tf.compat.v1.assign(counter, 0.0)
        signatures = {
            "get_counter": _signature(_PREDICT, {}, {"output": counter.op.outputs[0]}),
            "incr_counter": _signature(_PREDICT, {}, {"output": incr}),
            "incr_counter_by": _signature(_PREDICT, {"delta": delta}, {"output": incr_by}),
            "reset_counter": _signature(_PREDICT, {}, {"output": reset}),
        }
        return signatures, None, None, False

    with _staged(base, version_folder(version)) as (_, export_dir):
        _save_tf1(export_dir, build)
    return base


def export_matrix_half_plus_two(base: Path, version: int = 1) -> Path:
    """batching/matrix_half_plus_two/1: x (float [-1,3,3]) -> y = 0.5x + 2, constants only.

    Like the original, the version folder holds only saved_model.pb (no variables/). Returns base.
    """
    base = Path(base)
    tf = _tf()
    from tensorflow.core.protobuf import saved_model_pb2

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3, 3], name="x")
        y = tf.add(tf.constant(0.5) * x, tf.constant(2.0), name="y")
        tf.compat.v1.global_variables_initializer()
        meta_graph = tf.compat.v1.train.export_meta_graph(graph=graph)
    meta_graph.meta_info_def.tags.append(_SERVE)
    meta_graph.signature_def["serving_default"].CopyFrom(_signature(_PREDICT, {"x": x}, {"y": y}))
    saved_model = saved_model_pb2.SavedModel(saved_model_schema_version=1, meta_graphs=[meta_graph])
    with _staged(base, str(version)) as (_, export_dir):
        export_dir.mkdir()
        (export_dir / "saved_model.pb").write_bytes(saved_model.SerializeToString(deterministic=True))
    return base


def export_bad_half_plus_two(base: Path, version: int = 123) -> Path:
    """bad_half_plus_two/00000123: a legacy (V1 checkpoint + .meta) export without saved_model.pb.

    The version folder holds ``checkpoint``, ``export`` and ``export.meta`` (a half_plus_two graph and
    its variables, as a pre-SavedModel SessionBundle export) but no saved_model.pb/.pbtxt, so loading
    it as a SavedModel must fail with NOT_FOUND. Returns base.
    """
    base = Path(base)
    tf = _tf()
    with _staged(base, version_folder(version)) as (_, export_dir):
        export_dir.mkdir()
        graph = tf.Graph()
        with graph.as_default(), _quiet_tf_logging():
            a, b = _ref_variable(0.5, "Variable"), _ref_variable(2.0, "Variable_1")
            x = tf.compat.v1.placeholder(tf.float32, name="Placeholder")
            tf.add(a * x, b, name="Add")
            init = tf.compat.v1.global_variables_initializer()
            with tf.compat.v1.Session(graph=graph) as session:
                session.run(init)
                saver = tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V1)
                saver.save(session, str(export_dir / "export"), write_state=False)
        # The checkpoint state file, with a relative path so the folder can move.
        (export_dir / "checkpoint").write_text(
            'model_checkpoint_path: "export"\nall_model_checkpoint_paths: "export"\n'
        )
    return base


# --------------------------------------------------------------------------------------------------
# TF2


def export_half_plus_two_tf2(base: Path, version: int = 123) -> Path:
    """saved_model_half_plus_two_tf2_cpu/00000123: half_plus_two as a TF2 ``tf.Module``.

    Resource variables a, b, c and an asset foo.txt. Signatures (every method_name is predict):
    serving_default (x float [1] -> y [1], with a recorded default x = [0.0]); classify_x_to_y
    (inputs string [-1] -> scores [-1,1]), regress_x_to_y, regress_x_to_y2 (outputs [-1,1]) on
    serialized tf.Example; classify_x2_to_y3 and regress_x2_to_y3 (inputs float [1] -> 0.5x2 + 3, [1]);
    plus ``__saved_model_init_op``. Returns base.
    """
    base = Path(base)
    tf = _tf()
    string_batch = tf.TensorSpec([None], tf.string, name="inputs")
    one_float = tf.TensorSpec([1], tf.float32, name="inputs")
    no_x = tf.constant([0.0])

    class HalfPlusTwo(tf.Module):  # type: ignore[name-defined]  # tf is imported lazily
        def __init__(self, asset_path: str) -> None:
            super().__init__()
            self.a = tf.Variable(0.5, name="a")
            self.b = tf.Variable(2.0, name="b")
            self.c = tf.Variable(3.0, name="c")
            self.asset = tf.saved_model.Asset(asset_path)

        def _x(self, serialized: Any) -> Any:
            return _parse_x_x2(tf, serialized)["x"]

        # The default makes the signature record defaults {x: [0.0]} (a PlaceholderWithDefault), as the original.
        @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="x")])
        def predict(self, x: Any = no_x) -> dict[str, Any]:
            return {"y": self.a * x + self.b}

        @tf.function(input_signature=[string_batch])
        def classify_xy(self, inputs: Any) -> dict[str, Any]:
            return {"scores": self.a * self._x(inputs) + self.b}

        @tf.function(input_signature=[one_float])
        def classify_x2y3(self, inputs: Any) -> dict[str, Any]:
            return {"scores": self.a * inputs + self.c}

        @tf.function(input_signature=[string_batch])
        def regress_xy(self, inputs: Any) -> dict[str, Any]:
            return {"outputs": self.a * self._x(inputs) + self.b}

        @tf.function(input_signature=[string_batch])
        def regress_xy2(self, inputs: Any) -> dict[str, Any]:
            return {"outputs": self.a * self._x(inputs) + self.c}

        @tf.function(input_signature=[one_float])
        def regress_x2y3(self, inputs: Any) -> dict[str, Any]:
            return {"outputs": self.a * inputs + self.c}

    with _staged(base, version_folder(version)) as (scratch, export_dir), _quiet_tf_logging():
        asset = scratch / _ASSET_NAME
        asset.write_text(ASSET_FILE_CONTENTS)
        module = HalfPlusTwo(str(asset))
        signatures = {
            "regress_x_to_y": module.regress_xy,
            "regress_x_to_y2": module.regress_xy2,
            "regress_x2_to_y3": module.regress_x2y3,
            "classify_x_to_y": module.classify_xy,
            "classify_x2_to_y3": module.classify_x2y3,
            "serving_default": module.predict,
        }
        tf.saved_model.save(module, str(export_dir), signatures=signatures)
    return base


# --------------------------------------------------------------------------------------------------
# Expected REST metadata (GET /v1/models/<name>/metadata), as TF Serving answers for the originals.
# The exports above use the originals' tensor names, so these hold for them too.

_BATCH_1 = [-1, 1]


def _tensor_json(dtype: str, shape: list[int] | None, name: str) -> dict[str, Any]:
    if shape is None:
        tensor_shape: dict[str, Any] = {"dim": [], "unknown_rank": True}
    else:
        tensor_shape = {"dim": [{"size": str(size), "name": ""} for size in shape], "unknown_rank": False}
    return {"dtype": dtype, "tensor_shape": tensor_shape, "name": name}


def _signature_json(method: str, inputs: dict[str, tuple], outputs: dict[str, tuple]) -> dict[str, Any]:
    return {
        "inputs": {alias: _tensor_json(*spec) for alias, spec in inputs.items()},
        "outputs": {alias: _tensor_json(*spec) for alias, spec in outputs.items()},
        "method_name": method,
        "defaults": {},
    }


def _metadata(model_name: str, version: int, signatures: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_spec": {"name": model_name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": signatures}},
    }


def _tf1_signatures_json(classify_x2_to_y3: bool) -> dict[str, Any]:
    example = ("DT_STRING", None, "tf_example:0")
    y = ("DT_FLOAT", _BATCH_1, "y:0")
    x2 = ("DT_FLOAT", _BATCH_1, "x2:0")
    y3 = ("DT_FLOAT", _BATCH_1, "y3:0")
    signatures = {
        "serving_default": _signature_json(_PREDICT, {"x": ("DT_FLOAT", _BATCH_1, "x:0")}, {"y": y}),
        "classify_x_to_y": _signature_json(_CLASSIFY, {"inputs": example}, {"scores": y}),
        "regress_x_to_y": _signature_json(_REGRESS, {"inputs": example}, {"outputs": y}),
        "regress_x_to_y2": _signature_json(_REGRESS, {"inputs": example}, {"outputs": ("DT_FLOAT", _BATCH_1, "y2:0")}),
        "regress_x2_to_y3": _signature_json(_REGRESS, {"inputs": x2}, {"outputs": y3}),
    }
    if classify_x2_to_y3:
        signatures["classify_x2_to_y3"] = _signature_json(_CLASSIFY, {"inputs": x2}, {"scores": y3})
    return signatures


def half_plus_two_model_metadata(model_name: str = "default", version: int = 123) -> dict[str, Any]:
    """The parsed REST metadata of export_half_plus_two (== half_plus_two_model_metadata.json)."""
    return _metadata(model_name, version, _tf1_signatures_json(classify_x2_to_y3=False))


def half_plus_two_2_versions_metadata(
    model_name: str = "saved_model_half_plus_two_2_versions", version: int = 123
) -> dict[str, Any]:
    """The parsed REST metadata of export_half_plus_two_versions
    (== saved_model_half_plus_two_2_versions_metadata.json)."""
    return _metadata(model_name, version, _tf1_signatures_json(classify_x2_to_y3=True))


def half_plus_two_tf2_metadata(
    model_name: str = "saved_model_half_plus_two_2_versions", version: int = 123
) -> dict[str, Any]:
    """TF Serving's expected REST metadata for its TF2 half_plus_two
    (== saved_model_half_plus_two_tf2_2_versions_metadata.json, whose default name is kept).

    That file predates the signature defaults: the server's answer for both the shipped TF2 model and
    export_half_plus_two_tf2 also has serving_default "defaults": {"x": <DT_FLOAT [1] tensor 0.0>} and
    "defaults": {} in __saved_model_init_op; compare those keys separately or drop them.
    """
    one = [1]
    example = ("DT_STRING", [-1], "{}_inputs:0")

    def sig(key: str, input_spec: tuple, output_alias: str, output_spec: tuple) -> dict[str, Any]:
        dtype, shape, name = input_spec
        return _signature_json(_PREDICT, {"inputs": (dtype, shape, name.format(key))}, {output_alias: output_spec})

    signatures = {
        "serving_default": _signature_json(
            _PREDICT,
            {"x": ("DT_FLOAT", one, "serving_default_x:0")},
            {"y": ("DT_FLOAT", one, "StatefulPartitionedCall_5:0")},
        ),
        "classify_x2_to_y3": sig(
            "classify_x2_to_y3",
            ("DT_FLOAT", one, "{}_inputs:0"),
            "scores",
            ("DT_FLOAT", one, "StatefulPartitionedCall:0"),
        ),
        "classify_x_to_y": sig(
            "classify_x_to_y", example, "scores", ("DT_FLOAT", _BATCH_1, "StatefulPartitionedCall_1:0")
        ),
        "regress_x2_to_y3": sig(
            "regress_x2_to_y3",
            ("DT_FLOAT", one, "{}_inputs:0"),
            "outputs",
            ("DT_FLOAT", one, "StatefulPartitionedCall_2:0"),
        ),
        "regress_x_to_y": sig(
            "regress_x_to_y", example, "outputs", ("DT_FLOAT", _BATCH_1, "StatefulPartitionedCall_3:0")
        ),
        "regress_x_to_y2": sig(
            "regress_x_to_y2", example, "outputs", ("DT_FLOAT", _BATCH_1, "StatefulPartitionedCall_4:0")
        ),
        "__saved_model_init_op": {
            "inputs": {},
            "outputs": {"__saved_model_init_op": _tensor_json("DT_INVALID", None, "NoOp")},
            "method_name": "",
        },
    }
    return _metadata(model_name, version, signatures)


# --------------------------------------------------------------------------------------------------
# The whole tree


def export_testdata(root: Path) -> Path:
    """Write root/ laid out like shared/testdata/tf_serving for the models above; returns root.

    Model folders: saved_model_half_plus_two_cpu, saved_model_half_plus_two_2_versions,
    saved_model_half_plus_two_tf2_cpu, saved_model_half_plus_three, saved_model_counter,
    bad_half_plus_two, batching/matrix_half_plus_two. Files: good_model_config.txt (with the
    ``${...}`` placeholders), bad_model_config.txt, batching_config.txt, monitoring_config.txt and the
    three metadata JSON files.
    """
    root = Path(root)
    export_half_plus_two(root / "saved_model_half_plus_two_cpu")
    export_half_plus_two_versions(root / "saved_model_half_plus_two_2_versions")
    export_half_plus_two_tf2(root / "saved_model_half_plus_two_tf2_cpu")
    export_half_plus_three(root / "saved_model_half_plus_three")
    export_counter(root / "saved_model_counter")
    export_bad_half_plus_two(root / "bad_half_plus_two")
    export_matrix_half_plus_two(root / "batching" / "matrix_half_plus_two")
    texts = {
        "good_model_config.txt": GOOD_MODEL_CONFIG_TEMPLATE,
        "bad_model_config.txt": BAD_MODEL_CONFIG_TEXT,
        "batching_config.txt": BATCHING_CONFIG_TEXT,
        "monitoring_config.txt": MONITORING_CONFIG_TEXT,
        "half_plus_two_model_metadata.json": json.dumps(half_plus_two_model_metadata(), indent=1),
        "saved_model_half_plus_two_2_versions_metadata.json": json.dumps(half_plus_two_2_versions_metadata(), indent=1),
        "saved_model_half_plus_two_tf2_2_versions_metadata.json": json.dumps(half_plus_two_tf2_metadata(), indent=1),
    }
    for name, text in texts.items():
        (root / name).write_text(text)
    return root

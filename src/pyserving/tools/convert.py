"""`pyserving convert`: a TF1 checkpoint or a frozen GraphDef becomes a servable SavedModel version.

The SavedModel is written next to the base path's versions under a hidden
staging name and renamed into place only when complete, so a server polling the
base path never sees half a version.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from pyserving.errors import ServingError
from pyserving.runtimes.servable import CLASSIFY_METHOD, PREDICT_METHOD, REGRESS_METHOD
from pyserving.serving import classify_regress
from pyserving.tools import ToolError
from pyserving.tools.inspect import version_folders

__all__ = [
    "SignatureSpec",
    "from_checkpoint",
    "from_frozen_graph",
    "next_version",
    "parse_pairs",
    "publish",
    "set_method_names",
]

_METHODS = {"predict": PREDICT_METHOD, "classify": CLASSIFY_METHOD, "regress": REGRESS_METHOD}
_SHAPES = {
    "classify": "one input 'inputs' of serialized tf.Example, outputs 'classes' and/or 'scores'",
    "regress": "one input 'inputs' of serialized tf.Example, one output 'outputs'",
}


@dataclass(frozen=True)
class SignatureSpec:
    inputs: dict[str, str]  # alias -> tensor name
    outputs: dict[str, str]
    name: str = "serving_default"
    method: str = "predict"


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """`ALIAS=TENSOR` arguments; `x` means `x:0`."""
    parsed = {}
    for pair in pairs:
        alias, sep, tensor = pair.partition("=")
        if not sep or not alias or not tensor:
            raise ToolError(f"Expected ALIAS=TENSOR, got {pair!r}")
        parsed[alias] = tensor if ":" in tensor else f"{tensor}:0"
    return parsed


def from_checkpoint(source: str, export_base: str, spec: SignatureSpec, version: int | None) -> str:
    """Restore a checkpoint (its .meta graph and variables) and export it."""
    prefix = tf.train.latest_checkpoint(source) if os.path.isdir(source) else source
    if prefix is None or not os.path.exists(prefix + ".meta"):
        raise ToolError(f"No checkpoint with a .meta graph at {source}")
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        try:
            saver = tf.compat.v1.train.import_meta_graph(prefix + ".meta", clear_devices=True)
            saver.restore(session, prefix)
        except (tf.errors.OpError, ValueError, OSError) as exc:
            raise ToolError(f"Cannot restore checkpoint {prefix}: {getattr(exc, 'message', exc)}") from None
        return _export(graph, session, export_base, spec, version)


def from_frozen_graph(source: str, export_base: str, spec: SignatureSpec, version: int | None) -> str:
    """Import a frozen GraphDef (constants, no variables) and export it."""
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(source, "rb") as handle:
            graph_def.ParseFromString(handle.read())
    except OSError as exc:
        raise ToolError(f"Cannot read {source}: {exc.strerror}") from None
    except Exception:
        raise ToolError(f"{source} is not a binary GraphDef") from None
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        try:
            tf.compat.v1.import_graph_def(graph_def, name="")
        except ValueError as exc:
            raise ToolError(f"Cannot import {source}: {exc}") from None
        return _export(graph, session, export_base, spec, version)


def _export(
    graph: tf.Graph, session: tf.compat.v1.Session, export_base: str, spec: SignatureSpec, version: int | None
) -> str:
    signature = meta_graph_pb2.SignatureDef(method_name=_METHODS[spec.method])
    for aliases, target in ((spec.inputs, signature.inputs), (spec.outputs, signature.outputs)):
        for alias, name in aliases.items():
            try:
                tensor = graph.get_tensor_by_name(name)
            except (KeyError, ValueError):
                raise ToolError(f"Tensor {name} (for {alias!r}) is not in the graph") from None
            target[alias].CopyFrom(tf.compat.v1.saved_model.utils.build_tensor_info(tensor))
    try:
        if spec.method == "classify":
            classify_regress.check_classify_signature(signature, method_name_check=True)
        elif spec.method == "regress":
            classify_regress.check_regress_signature(signature, method_name_check=True)
    except ServingError as exc:
        raise ToolError(
            f"Not a valid {spec.method} signature ({_SHAPES[spec.method]}): "
            f"{exc.message.split(': inputs {')[0].split('. Signature was')[0]}"
        ) from None
    version = next_version(export_base) if version is None else version
    target = os.path.join(export_base, str(version))
    if os.path.exists(target):
        raise ToolError(f"{target} already exists")
    staging = os.path.join(export_base, f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    builder = tf.compat.v1.saved_model.Builder(staging)
    builder.add_meta_graph_and_variables(
        session, [tf.saved_model.SERVING], signature_def_map={spec.name: signature}, strip_default_attrs=True
    )
    builder.save()
    publish(staging, target)
    return target


def next_version(export_base: str) -> int:
    """One above the highest numeric folder of `export_base` (1 if none, or if it does not exist yet)."""
    if not os.path.isdir(export_base):
        return 1
    return max(version_folders(export_base), default=0) + 1


def set_method_names(folder: str, methods: dict[str, str]) -> None:
    """Set signatures' method_name in a written SavedModel (`tf.saved_model.save` writes predict for all)."""
    path = os.path.join(folder, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel()
    with open(path, "rb") as handle:
        saved_model.ParseFromString(handle.read())
    for meta_graph in saved_model.meta_graphs:
        for signature_name, method_name in methods.items():
            meta_graph.signature_def[signature_name].method_name = method_name
    with open(path, "wb") as handle:
        handle.write(saved_model.SerializeToString())


def publish(staging: str, target: str) -> None:
    """Rename a finished export into its version folder (atomic on one filesystem)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(staging, target)

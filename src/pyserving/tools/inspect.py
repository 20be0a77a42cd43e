"""`pyserving inspect`: the versions of a model and the signatures of its newest one."""

from __future__ import annotations

import json
import os

from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving.lifecycle.sources import parse_version, version_entries
from pyserving.runtimes.tf_saved_model import SAVED_MODEL_FILES, read_signature_defs
from pyserving.tools import ToolError

__all__ = ["describe", "newest_version", "render", "version_folders"]


def version_folders(base: str) -> dict[int, str]:
    """Numeric children of a base path, {version: folder}."""
    if not os.path.isdir(base):
        raise ToolError(f"{base} is not a folder")
    found: dict[int, str] = {}
    for version, path in version_entries(base):
        if os.path.isdir(path):
            found.setdefault(version, path)
    return found


def newest_version(base: str, version: int | None = None) -> tuple[int, str]:
    """(version, folder): `version` if given, else the highest."""
    found = version_folders(base)
    if not found:
        raise ToolError(f"No numeric version folder under {base}")
    if version is None:
        version = max(found)
    if version not in found:
        raise ToolError(f"No version {version} under {base} (found: {', '.join(map(str, sorted(found)))})")
    return version, found[version]


def describe(path: str, tags: list[str]) -> dict:
    """`{"versions": [...], "signatures": {...}}` for a base path or a version folder."""
    if any(os.path.exists(os.path.join(path, f)) for f in SAVED_MODEL_FILES):
        number = parse_version(os.path.basename(os.path.normpath(path)))
        versions, folder = ([number] if number is not None else []), path
    else:
        found = version_folders(path)
        if not found:
            raise ToolError(f"No SavedModel and no numeric version folder at {path}")
        versions, folder = sorted(found), found[max(found)]
    signatures = read_signature_defs(folder, tags)
    return {"versions": versions, "signatures": {key: _signature(signatures[key]) for key in sorted(signatures)}}


def _signature(signature: meta_graph_pb2.SignatureDef) -> dict:
    return {
        "method_name": signature.method_name,
        "inputs": {alias: _tensor(signature.inputs[alias]) for alias in sorted(signature.inputs)},
        "outputs": {alias: _tensor(signature.outputs[alias]) for alias in sorted(signature.outputs)},
    }


def _tensor(info: meta_graph_pb2.TensorInfo) -> dict:
    shape = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    return {"dtype": types_pb2.DataType.Name(info.dtype), "shape": shape, "name": info.name}


def render(description: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(description)
    lines = [f"Versions: {', '.join(map(str, description['versions'])) or '(a version folder without a number)'}"]
    for key, signature in description["signatures"].items():
        lines.append(f'Signature "{key}" ({signature["method_name"]})')
        for kind in ("inputs", "outputs"):
            lines.append(f"  {kind}:")
            for alias, tensor in signature[kind].items():
                shape = "unknown rank" if tensor["shape"] is None else str(tensor["shape"])
                lines.append(f"    {alias}: {tensor['dtype']} {shape} ({tensor['name']})")
    return "\n".join(lines)

"""`pyserving inspect`: the versions of a model, its runtime and the signatures of its newest version.

Any runtime in the registry: the version folder's files say which (`registry.detect`), and the
runtime reads its signatures as cheaply as it can (a SavedModel's are read from its .pb).
"""

from __future__ import annotations

import json
import os

from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from pyserving.lifecycle.sources import parse_version, version_entries
from pyserving.runtimes import registry
from pyserving.tools import ToolError

__all__ = ["describe", "newest_version", "render", "signatures_of", "version_folders"]


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


def signatures_of(
    folder: str, tags: list[str], prefer_tflite_model: bool = False
) -> tuple[str, str, dict[str, meta_graph_pb2.SignatureDef]]:
    """(platform, runtime module, signatures) of a version folder, as the server would serve it; a folder no
    runtime recognises is read as a SavedModel, whose error names the files it looked for. A folder whose only
    model is `model.tflite` is read as the server serves it with --prefer_tflite_model."""
    platform = registry.detect(folder) or registry.TENSORFLOW_PLATFORM
    options = registry.options_for_tools(
        folder, registry.RuntimeOptions(saved_model_tags=tuple(tags), prefer_tflite_model=prefer_tflite_model)
    )
    runtime = registry.runtime(platform, folder, options)
    return platform, runtime.rsplit(".", 1)[-1], registry.signature_defs(platform, folder, options)


def describe(path: str, tags: list[str], prefer_tflite_model: bool = False) -> dict:
    """`{"versions": [...], "platform": ..., "signatures": {...}}` for a base path or a version folder."""
    if registry.detect(path) is not None:
        number = parse_version(os.path.basename(os.path.normpath(path)))
        versions, folder = ([number] if number is not None else []), path
    else:
        found = version_folders(path)
        if not found:
            raise ToolError(f"No SavedModel and no numeric version folder at {path}")
        versions, folder = sorted(found), found[max(found)]
    platform, runtime, signatures = signatures_of(folder, tags, prefer_tflite_model)
    return {
        "versions": versions,
        "platform": platform,
        "runtime": runtime,
        "signatures": {key: _signature(signatures[key]) for key in sorted(signatures)},
    }


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
    lines = [
        f"Versions: {', '.join(map(str, description['versions'])) or '(a version folder without a number)'}",
        f"Platform: {description['platform']} (runtime: {description['runtime']})",
    ]
    for key, signature in description["signatures"].items():
        lines.append(f'Signature "{key}" ({signature["method_name"]})')
        for kind in ("inputs", "outputs"):
            lines.append(f"  {kind}:")
            for alias, tensor in signature[kind].items():
                shape = "unknown rank" if tensor["shape"] is None else str(tensor["shape"])
                lines.append(f"    {alias}: {tensor['dtype']} {shape} ({tensor['name']})")
    return "\n".join(lines)

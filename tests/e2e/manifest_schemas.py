"""Validates Kubernetes documents against the model classes of the packages that define them, for
tests/e2e/test_deploy_manifests.py: the `kserve` package (0.21.0) for serving.kserve.io kinds, the
`kubernetes` package (37.0.1, Kubernetes' OpenAPI models) for the core ones.

Run by .venvs/kserve-client's python (kserve needs protobuf<7), never imported by the tests. Reads a JSON
list of documents on stdin; prints a JSON list with one result per document: {"class": model class name
or null, "errors": [...]}.

The kubernetes package's models are pydantic models with strict types that forbid unknown fields:
`model_validate` checks a document (or a kserve model's Kubernetes-typed field) whole. The kserve
package's models are older generated classes whose deserializer skips keys it does not know and accepts
any JSON type, so they are built here field by field from `openapi_types` and `attribute_map`, with their
client-side validation on (required fields): a key the schema lacks and a value of the wrong JSON type are
errors, named by their path. Either way the built object is serialized back (the kubernetes package's
ApiClient for its models, attribute_map for kserve's) and must equal the document, which also catches a
field given under its Python name (`container_port`), which the kubernetes models accept.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from typing import Any

import kserve
import kubernetes.client
import pydantic
from kubernetes.client import ApiClient

_CLASSES = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): kserve.V1alpha1ServingRuntime,
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): kserve.V1alpha1ClusterServingRuntime,
    ("serving.kserve.io/v1beta1", "InferenceService"): kserve.V1beta1InferenceService,
    ("apps/v1", "Deployment"): kubernetes.client.V1Deployment,
    ("v1", "Service"): kubernetes.client.V1Service,
    ("v1", "ConfigMap"): kubernetes.client.V1ConfigMap,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): kubernetes.client.V2HorizontalPodAutoscaler,
}
_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


class _Invalid(Exception):
    pass


def _model_class(name: str) -> type:
    for module in (kserve.models, kubernetes.client.models):
        klass = getattr(module, name, None)
        if klass is not None:
            return klass
    raise _Invalid(f"no model class {name}")


def _build(value: Any, type_name: str, path: str, errors: list[str]) -> Any:
    if value is None:
        return None
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return None
        return [_build(item, match[1], f"{path}[{i}]", errors) for i, item in enumerate(value)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return None
        return {key: _build(item, match[1] or match[2], f"{path}.{key}", errors) for key, item in value.items()}
    if type_name in _PRIMITIVES:
        if not isinstance(value, _PRIMITIVES[type_name]) or (type_name != "bool" and isinstance(value, bool)):
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    if type_name == "object":  # IntOrString, Quantity's free forms, RawExtension
        return value
    if type_name in ("datetime", "date"):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a timestamp string, got {type(value).__name__}")
            return None
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    klass = _model_class(type_name)
    if issubclass(klass, pydantic.BaseModel):
        try:
            return klass.model_validate(value)
        except pydantic.ValidationError as exc:
            for error in exc.errors():
                where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
                errors.append(f"{path}{where}: {error['msg']}")
            return None
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
        return None
    attributes = {json_key: attribute for attribute, json_key in klass.attribute_map.items()}
    kwargs = {}
    for key, item in value.items():
        if key not in attributes:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        kwargs[attributes[key]] = _build(item, klass.openapi_types[attributes[key]], f"{path}.{key}", errors)
    try:
        built = klass(**kwargs)
    except ValueError as exc:  # client-side validation: a required field missing, a value not allowed
        errors.append(f"{path}: {type_name}: {exc}")
        return None
    built._given = list(kwargs)  # some constructors fill defaults ("" for a name): serialize only these
    return built


def _serialize(value: Any) -> Any:
    """Back to the document's JSON: kubernetes models by their aliases, kserve ones by attribute_map."""
    if isinstance(value, list):
        return [_serialize(item) for item in value]
    if isinstance(value, dict):
        return {key: _serialize(item) for key, item in value.items()}
    if isinstance(value, pydantic.BaseModel):
        return ApiClient().sanitize_for_serialization(value)
    if hasattr(value, "attribute_map"):
        return {
            value.attribute_map[attribute]: _serialize(getattr(value, attribute))
            for attribute in value._given
            if getattr(value, attribute) is not None
        }
    return ApiClient().sanitize_for_serialization(value)


def validate(document: Any) -> dict[str, Any]:
    if not isinstance(document, dict):
        return {"class": None, "errors": ["a document must be a map"]}
    klass = _CLASSES.get((document.get("apiVersion"), document.get("kind")))
    if klass is None:
        return {"class": None, "errors": [f"no model class for {document.get('apiVersion')} {document.get('kind')}"]}
    errors: list[str] = []
    built = _build(document, klass.__name__, document["kind"], errors)
    if not errors and (serialized := _serialize(built)) != document:
        errors.append(f"the document does not survive a round trip through its model class: {serialized}")
    return {"class": klass.__name__, "errors": errors}


def main() -> None:
    assert kserve.configuration.Configuration().client_side_validation
    assert kubernetes.client.Configuration().client_side_validation
    print(json.dumps([validate(document) for document in json.load(sys.stdin)]))


if __name__ == "__main__":
    main()

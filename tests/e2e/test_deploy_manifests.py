"""deploy/: every manifest against the schema of the package that defines it, and what each must say.

Schemas: the kserve package's models (ServingRuntime, InferenceService) and the kubernetes package's
OpenAPI models (Deployment, Service, ConfigMap, HorizontalPodAutoscaler), through
tests/e2e/manifest_schemas.py in .venvs/kserve-client (kserve needs protobuf<7; the kubernetes package
comes with it). KEDA publishes no Python models: its ScaledObject is checked here against the fields KEDA's
documentation defines (keda.sh/v1alpha1 ScaledObject; scaleTargetRef; a prometheus trigger's serverAddress,
query and threshold), which is not a schema validation.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pyserving import flags

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KSERVE_PYTHON = ROOT / ".venvs" / "kserve-client" / "bin" / "python"
VALIDATOR = Path(__file__).with_name("manifest_schemas.py")

# KServe's kserve-tensorflow-serving runtime (config/runtimes/kserve-tensorflow-serving.yaml): pyserving's image
# must run under exactly this command and these arguments.
KSERVE_TFS_COMMAND = ["/usr/bin/tensorflow_model_server"]
KSERVE_TFS_ARGS = [
    "--model_name={{.Name}}",
    "--port=9000",
    "--rest_api_port=8080",
    "--model_base_path=/mnt/models",
    "--rest_api_timeout_in_ms=60000",
]
# The autoscaling signal, in one place: the Prometheus series pyserving exports (a gauge per model_name),
# and the name prometheus-adapter serves it under to the HPA (its rule: docs/DEPLOY.md "Plain Kubernetes").
IN_FLIGHT_SERIES = ":pyserving:requests_in_flight"
IN_FLIGHT_ADAPTER_NAME = "pyserving_requests_in_flight"
# Kubernetes' default terminationGracePeriodSeconds, and the margin left for unloading and exiting.
DEFAULT_POD_GRACE_S = 30
EXIT_MARGIN_S = 5

FILES = {
    "kserve/servingruntime.yaml": ["ServingRuntime"],
    "kserve/inferenceservice.yaml": ["InferenceService"],
    "kubernetes/configmap.yaml": ["ConfigMap"],
    "kubernetes/deployment.yaml": ["Deployment"],
    "kubernetes/service.yaml": ["Service"],
    "kubernetes/hpa/hpa.yaml": ["HorizontalPodAutoscaler"],
    "kubernetes/keda/scaledobject.yaml": ["ScaledObject"],
}
SCHEMA_CLASSES = {
    "ServingRuntime": "V1alpha1ServingRuntime",
    "InferenceService": "V1beta1InferenceService",
    "ConfigMap": "V1ConfigMap",
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
}


def _documents() -> dict[str, list[dict]]:
    return {name: list(yaml.safe_load_all((DEPLOY / name).read_text())) for name in FILES}


DOCS = _documents()
RUNTIME = DOCS["kserve/servingruntime.yaml"][0]
ISVC = DOCS["kserve/inferenceservice.yaml"][0]
CONFIGMAP = DOCS["kubernetes/configmap.yaml"][0]
DEPLOYMENT = DOCS["kubernetes/deployment.yaml"][0]
SERVICE = DOCS["kubernetes/service.yaml"][0]
HPA = DOCS["kubernetes/hpa/hpa.yaml"][0]
SCALED_OBJECT = DOCS["kubernetes/keda/scaledobject.yaml"][0]


def _validate(documents: list[dict]) -> list[dict]:
    if not KSERVE_PYTHON.exists():
        pytest.skip(f"{KSERVE_PYTHON.parent.parent} does not exist: run `bin/install --test` (kserve needs protobuf<7)")
    done = subprocess.run(
        [str(KSERVE_PYTHON), str(VALIDATOR)], input=json.dumps(documents), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _broken() -> list[tuple[dict, list[str]]]:
    """Documents with one kind of mistake each, and the errors the schema check must name."""
    typo, wrong_types, missing = copy.deepcopy(RUNTIME), copy.deepcopy(DEPLOYMENT), copy.deepcopy(RUNTIME)
    typo["spec"]["containers"][0]["securityContxt"] = typo["spec"]["containers"][0].pop("securityContext")
    typo["spec"]["protocolVersion"] = typo["spec"].pop("protocolVersions")
    wrong_types["spec"]["replicas"] = "2"
    wrong_types["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    missing["spec"]["containers"][0].pop("name")
    python_name = copy.deepcopy(ISVC)
    python_name["spec"]["predictor"]["termination_grace_period_seconds"] = python_name["spec"]["predictor"].pop(
        "terminationGracePeriodSeconds"
    )
    pod_key = copy.deepcopy(DEPLOYMENT)
    pod_key["spec"]["template"]["spec"]["containers"][0]["ports"][0]["container_port"] = 8500
    del pod_key["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    return [
        (
            typo,
            [
                "ServingRuntime.spec.containers[0].securityContxt: Extra inputs are not permitted",
                "ServingRuntime.spec.protocolVersion: unknown field of V1alpha1ServingRuntimeSpec",
            ],
        ),
        (
            wrong_types,
            [
                "Deployment.spec.replicas: Input should be a valid integer",
                "Deployment.spec.template.spec.containers[0].readinessProbe.httpGet.pth: "
                "Extra inputs are not permitted",
            ],
        ),
        (missing, ["ServingRuntime.spec.containers[0].name: Field required"]),
        (
            python_name,
            ["InferenceService.spec.predictor.termination_grace_period_seconds: unknown field of V1beta1PredictorSpec"],
        ),
        (pod_key, ["the document does not survive a round trip through its model class"]),
    ]


@pytest.fixture(scope="module")
def validated() -> tuple[list[dict], list[dict]]:
    """(results for every shipped document, results for `_broken()`), from one validator run."""
    shipped = [doc for docs in DOCS.values() for doc in docs if doc["kind"] in SCHEMA_CLASSES]
    broken = [doc for doc, _ in _broken()]
    results = _validate(shipped + broken)
    return results[: len(shipped)], results[len(shipped) :]


def _shutdown_s(args: list[str]) -> int:
    """The longest a SIGTERM'd server with these arguments takes before exiting: the drain delay plus the grace."""
    parsed = flags.parse(args)
    assert parsed.unknown == []
    return parsed.options.shutdown_delay_seconds + parsed.options.shutdown_grace_period_seconds


def test_every_manifest_is_where_expected_with_its_kinds():
    assert sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml")) == sorted(FILES)
    assert {name: [doc["kind"] for doc in docs] for name, docs in DOCS.items()} == FILES


def test_every_manifest_matches_its_packages_schema(validated):
    shipped, _ = validated
    kinds = [doc["kind"] for docs in DOCS.values() for doc in docs if doc["kind"] in SCHEMA_CLASSES]
    assert shipped == [{"class": SCHEMA_CLASSES[kind], "errors": []} for kind in kinds]


def test_the_schema_check_names_typos_wrong_types_missing_fields_and_python_names(validated):
    _, broken = validated
    expected = [errors for _, errors in _broken()]
    assert [result["errors"] for result in broken[:4]] == expected[:4]
    [round_trip] = broken[4]["errors"]
    assert round_trip.startswith(expected[4][0] + ": ")
    assert "'containerPort': 8500" in round_trip


def test_serving_runtime_runs_kserves_tf_serving_command_and_args_unchanged():
    assert (RUNTIME["apiVersion"], RUNTIME["kind"], RUNTIME["metadata"]["name"]) == (
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
        "pyserving",
    )
    spec = RUNTIME["spec"]
    # TF Serving's protocol over REST and gRPC, and the Open Inference Protocol (V2) over both.
    assert spec["protocolVersions"] == ["v1", "v2", "grpc-v1", "grpc-v2"]
    assert [(f["name"], f["version"], f["autoSelect"]) for f in spec["supportedModelFormats"]] == [
        ("tensorflow", "1", True),
        ("tensorflow", "2", True),
    ]
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe's controller looks for
    assert (container["command"], container["args"]) == (KSERVE_TFS_COMMAND, KSERVE_TFS_ARGS)
    # No ports declared: KServe routes (and Knative probes, over TCP) its default port 8080, the REST port.
    assert "ports" not in container
    assert flags.parse(container["args"]).options.rest_api_port == 8080
    assert container["securityContext"] == {
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # A read-only root filesystem: the temporary folder is an emptyDir.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert spec["volumes"] == [{"name": "tmp", "emptyDir": {}}]


def test_inference_service_uses_the_runtime_and_leaves_room_for_the_drain():
    predictor = ISVC["spec"]["predictor"]
    assert predictor["model"]["runtime"] == RUNTIME["metadata"]["name"]
    assert predictor["model"]["modelFormat"] == {"name": "tensorflow"}
    assert predictor["model"]["protocolVersion"] in RUNTIME["spec"]["protocolVersions"]
    # KServe's arguments leave pyserving's shutdown flags at their defaults: 5 s + 20 s, inside the pod's
    # default 30 s grace, which the example states.
    shutdown_s = _shutdown_s(RUNTIME["spec"]["containers"][0]["args"])
    assert shutdown_s == 25
    assert predictor["terminationGracePeriodSeconds"] == DEFAULT_POD_GRACE_S >= shutdown_s + EXIT_MARGIN_S


def test_deployment_probes_ports_security_and_drain():
    assert DEPLOYMENT["apiVersion"] == "apps/v1"
    pod = DEPLOYMENT["spec"]["template"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    [container] = pod["spec"]["containers"]
    assert container["command"] == KSERVE_TFS_COMMAND
    options = flags.parse(container["args"]).options
    assert (options.port, options.rest_api_port) == (8500, 8501)
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("grpc", 8500), ("http", 8501)]
    # Ports open only after the initial load: a TCP startup probe, then pyserving's readiness and liveness.
    assert container["startupProbe"]["tcpSocket"] == {"port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["spec"]["securityContext"] == {
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # The drain (delay + grace) ends inside the pod's grace period, with room to exit.
    assert pod["spec"]["terminationGracePeriodSeconds"] == DEFAULT_POD_GRACE_S
    assert _shutdown_s(container["args"]) + EXIT_MARGIN_S <= DEFAULT_POD_GRACE_S
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts == {"models": "/models", "config": "/etc/pyserving", "tmp": "/tmp"}
    assert volumes["config"]["configMap"]["name"] == CONFIGMAP["metadata"]["name"]
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert options.model_base_path.startswith(mounts["models"] + "/")
    # Prometheus scrapes the REST port at the path the monitoring config (from the ConfigMap) serves.
    config_file = Path(options.monitoring_config_file)
    assert config_file.parent.as_posix() == mounts["config"]
    monitoring = CONFIGMAP["data"][config_file.name]
    [path] = re.findall(r'path: "([^"]+)"', monitoring)
    assert "enable: true" in monitoring
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(options.rest_api_port),
        "prometheus.io/path": path,
    }


def test_service_exposes_the_named_container_ports():
    assert SERVICE["spec"]["selector"] == DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [(p["name"], p["port"], p["targetPort"], p["appProtocol"]) for p in SERVICE["spec"]["ports"]] == [
        ("grpc", 8500, "grpc", "grpc"),
        ("http", 8501, "http", "http"),
    ]
    assert {p["targetPort"] for p in SERVICE["spec"]["ports"]} == container_ports


def test_hpa_scales_the_deployment_on_requests_in_flight_per_pod():
    target = HPA["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "pyserving")
    assert target["name"] == DEPLOYMENT["metadata"]["name"]
    assert (HPA["spec"]["minReplicas"], HPA["spec"]["maxReplicas"]) == (2, 10)
    assert HPA["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": IN_FLIGHT_ADAPTER_NAME},
                "target": {"type": "AverageValue", "averageValue": "8"},
            },
        }
    ]


def test_keda_scaled_object_has_the_fields_kedas_docs_define():
    """Not a schema validation (KEDA publishes none for Python): the fields of KEDA's ScaledObject
    reference (keda.sh/v1alpha1) this object uses, their types, and a prometheus trigger's metadata."""
    assert (SCALED_OBJECT["apiVersion"], SCALED_OBJECT["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert set(SCALED_OBJECT) == {"apiVersion", "kind", "metadata", "spec"}
    spec = SCALED_OBJECT["spec"]
    documented = {
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "initialCooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }
    assert set(spec) <= documented
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pyserving"}
    assert spec["scaleTargetRef"]["name"] == DEPLOYMENT["metadata"]["name"]
    for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert type(spec[field]) is int, field
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert set(trigger) == {"type", "metadata"}
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert set(metadata) == {"serverAddress", "query", "threshold"}
    # KEDA reads trigger metadata as strings; threshold is the target per replica.
    assert all(isinstance(value, str) for value in metadata.values())
    assert re.fullmatch(r"https?://[^/\s]+", metadata["serverAddress"])
    assert metadata["query"] == 'sum(%s{model_name="half_plus_two"})' % IN_FLIGHT_SERIES
    assert float(metadata["threshold"]) == 8.0
    # The model the query names is the one the Deployment serves.
    options = flags.parse(DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]["args"]).options
    assert f'model_name="{options.model_name}"' in metadata["query"]

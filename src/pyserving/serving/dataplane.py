"""The data plane: Predict, Classify, Regress, MultiInference, metadata and status, for every protocol.

Protocols translate their wire format into these calls and back. A request first
resolves its `ModelSpec` to a `Target` (a leased model version); everything TF
Serving decides independently of the protocol (signature checks, input and
output_filter validation, runtime metrics) happens here. `predict` is a
coroutine for the event loop; the others are synchronous and run on worker
threads (see `pyserving.concurrency`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from pyserving import metrics, tensors, tracing
from pyserving.concurrency import run_sync
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.lifecycle.manager import Lease, ModelManager, VersionStatus
from pyserving.runtimes.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, PREDICT_METHOD, REGRESS_METHOD, Servable
from pyserving.serving import classify_regress

__all__ = ["DataPlane", "ModelSpec", "MultiInferenceResult", "PredictResult", "Target"]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which model, version (or label) and signature a request asks for."""

    name: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""


class Target:
    """The model version a request runs on; a `with` block holds it (it cannot unload meanwhile)."""

    __slots__ = ("model", "version", "servable", "platform", "_lease")

    def __init__(
        self, model: str, version: int, servable: Servable, lease: Lease | None = None, platform: str = ""
    ) -> None:
        self.model = model
        self.version = version
        self.servable = servable
        self.platform = platform  # the model config's model_platform
        self._lease = lease

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        return self.servable.signature_defs

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._lease is not None:
            self._lease.release()


@dataclass(slots=True)
class PredictResult:
    model: str
    version: int
    signature_name: str  # the key that ran (the default one if the request named none)
    outputs: dict[str, np.ndarray]


@dataclass(slots=True)
class MultiInferenceResult:
    signature_name: str
    method_name: str
    result: classification_pb2.ClassificationResult | regression_pb2.RegressionResult


_EXAMPLE_CHECKS = {
    CLASSIFY_METHOD: classify_regress.check_classify_signature,
    REGRESS_METHOD: classify_regress.check_regress_signature,
}


class DataPlane:
    def __init__(self, manager: ModelManager, method_name_check: bool, max_decoded_bytes: int = 0) -> None:
        """`max_decoded_bytes` (> 0, `--max_decoded_tensor_bytes`) bounds what one request's input tensors
        may take once decoded, in every protocol: the protocols check their own decoding against it, and the
        data plane the tf.Example tensor a classify/regress request builds (each example carries a copy of
        the context)."""
        self._manager = manager
        self._method_name_check = method_name_check
        self.max_decoded_bytes = max_decoded_bytes

    def resolve(self, spec: ModelSpec) -> Target:
        """The version `spec` targets (TF Serving's lookup errors otherwise), held until the `with` block ends."""
        lease = self._manager.lease(spec.name, spec.version, spec.label)
        return Target(spec.name, lease.version, lease.servable, lease, lease.platform)

    def knows(self, name: str) -> bool:
        """Whether `name` is (or was) a configured model."""
        return self._manager.knows(name)

    def metric_label(self, name: str) -> str:
        """`name` as a request metric's model_name: itself for a configured model, else one shared label
        (a client must not be able to add label values, as many as it likes, to the metrics)."""
        return name if self._manager.knows(name) else metrics.UNKNOWN_MODEL

    async def predict(
        self,
        target: Target,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        output_filter: Sequence[str] = (),
        timeout_ms: int = 0,
        executor: Executor | None = None,
    ) -> PredictResult:
        """Run a predict signature. The session call goes to `executor` (None: the calling thread, for a
        caller that owns its event loop, such as warmup) or, for a servable that schedules its own work
        (`runs_async(key)`: a batched servable, a Python processing signature), is awaited on the loop
        without holding a thread."""
        key = signature_name or DEFAULT_SIGNATURE
        if tracing.enabled:
            tracing.annotate(target.model, target.version, key, _rows(inputs))
        signature = target.signature_defs.get(key)
        if signature is None:
            raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.')
        if self._method_name_check and signature.method_name != PREDICT_METHOD:
            raise ServingError(
                Code.INTERNAL,
                f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, "
                f"{CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {signature.method_name}",
            )
        feeds = _complete_inputs(signature, inputs)
        aliases = _output_aliases(signature, output_filter)
        servable = target.servable
        started = time.perf_counter()
        runs_async = getattr(servable, "runs_async", None)
        if runs_async is not None and runs_async(key):
            arrays = await servable.run_async(key, feeds, aliases, timeout_ms)  # type: ignore[attr-defined]
        elif executor is None:
            arrays = servable.run(key, feeds, aliases, timeout_ms)
        else:
            arrays = await run_sync(executor, servable.run, key, feeds, aliases, timeout_ms)
        _record_runtime(target, "Predict", started)
        return PredictResult(target.model, target.version, key, dict(zip(aliases, arrays, strict=True)))

    def classify(
        self, target: Target, signature_name: str, request_input: input_pb2.Input, timeout_ms: int = 0
    ) -> tuple[str, classification_pb2.ClassificationResult]:
        """Run a classification signature on tf.Examples: (signature key, result)."""
        key, outputs, count = self._run_examples(
            target, signature_name, request_input, timeout_ms, classify_regress.check_classify_signature, "Classify"
        )
        return key, classify_regress.classification_result(outputs, count)

    def regress(
        self, target: Target, signature_name: str, request_input: input_pb2.Input, timeout_ms: int = 0
    ) -> tuple[str, regression_pb2.RegressionResult]:
        """Run a regression signature on tf.Examples: (signature key, result)."""
        key, outputs, count = self._run_examples(
            target, signature_name, request_input, timeout_ms, classify_regress.check_regress_signature, "Regress"
        )
        return key, classify_regress.regression_result(outputs[classify_regress.OUTPUTS], count)

    def _run_examples(
        self,
        target: Target,
        signature_name: str,
        request_input: input_pb2.Input,
        timeout_ms: int,
        check: Any,
        api: str,
    ) -> tuple[str, dict[str, np.ndarray], int]:
        key = signature_name or DEFAULT_SIGNATURE
        signature = target.signature_defs.get(key)
        if signature is None:
            raise invalid_argument(f"No signature was found with the name: {key}")
        aliases = check(signature, self._method_name_check)
        examples = classify_regress.serialized_examples(request_input, self.max_decoded_bytes)
        metrics.record_examples(target.model, len(examples))
        if tracing.enabled:
            tracing.annotate(target.model, target.version, key, len(examples))
        started = time.perf_counter()
        arrays = target.servable.run(key, {classify_regress.INPUTS: examples}, aliases, timeout_ms)
        _record_runtime(target, api, started)
        return key, dict(zip(aliases, arrays, strict=True)), len(examples)

    def multi_inference(
        self,
        target: Target,
        tasks: Sequence[tuple[ModelSpec, str]],
        request_input: input_pb2.Input,
        timeout_ms: int = 0,
    ) -> list[MultiInferenceResult]:
        """Several classify/regress tasks (spec, method name) on one input, in one execution of `target`
        (the version the first task's spec resolved to)."""
        runs: list[tuple[str, str, list[str]]] = []
        seen: set[str] = set()
        for spec, method in tasks:
            if not spec.name:
                raise invalid_argument("Found ModelSpec with an empty model name.")
            if spec.name != tasks[0][0].name:
                raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
            key = spec.signature_name or DEFAULT_SIGNATURE
            if key in seen:
                raise invalid_argument(f"Duplicate evaluation of signature: {key}")
            seen.add(key)
            signature = target.signature_defs.get(key)
            if signature is None:
                raise invalid_argument(f"Requested signature not found in model graph: {key}")
            if method not in _EXAMPLE_CHECKS:
                raise ServingError(Code.UNIMPLEMENTED, f"Unsupported signature method_name: {method}")
            runs.append((key, method, _EXAMPLE_CHECKS[method](signature, self._method_name_check)))
        examples = classify_regress.serialized_examples(request_input, self.max_decoded_bytes)
        metrics.record_examples(target.model, len(examples))
        if tracing.enabled:
            tracing.annotate(target.model, target.version, ",".join(key for key, _, _ in runs), len(examples))
        started = time.perf_counter()
        outputs = target.servable.run_multi(
            [(key, aliases) for key, _, aliases in runs], {classify_regress.INPUTS: examples}, timeout_ms
        )
        _record_runtime(target, "MultiInference", started)
        results = []
        for (key, method, aliases), arrays in zip(runs, outputs, strict=True):
            result: classification_pb2.ClassificationResult | regression_pb2.RegressionResult
            if method == CLASSIFY_METHOD:
                result = classify_regress.classification_result(dict(zip(aliases, arrays, strict=True)), len(examples))
            else:
                result = classify_regress.regression_result(arrays[0], len(examples))
            results.append(MultiInferenceResult(key, method, result))
        return results

    def status(self, name: str, version: int | None) -> list[VersionStatus]:
        """Every version's status, highest first (END versions included), or one version's."""
        return self._manager.status(name, version)


def _record_runtime(target: Target, api: str, started: float) -> None:
    """runtime_latency: time inside the servable's run."""
    metrics.RUNTIME_LATENCY.observe(
        target.model, api, target.servable.runtime, value=(time.perf_counter() - started) * 1e6
    )


def _rows(inputs: dict[str, np.ndarray]) -> int | None:
    """A predict call's batch size: its inputs' first dimension (None: no input, or a scalar one)."""
    first = next(iter(inputs.values()), None)
    return first.shape[0] if first is not None and first.ndim else None


def _complete_inputs(signature: meta_graph_pb2.SignatureDef, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check the request's input keys against the signature; fill omitted ones from `defaults`."""
    if len(inputs) == len(signature.inputs) and all(alias in signature.inputs for alias in inputs):
        return inputs
    expected = set(signature.inputs)
    sent = set(inputs)
    extra = sorted(sent - expected)
    missing = sorted(expected - sent - set(signature.defaults))
    if len(sent) != len(expected) and (extra or missing):
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
        )
    for alias in extra:
        raise invalid_argument(
            f"input tensor alias not found in signature: {alias}. Inputs expected to be in the set "
            f"{{{','.join(sorted(expected))}}}."
        )
    if sent == expected:
        return inputs
    feeds = dict(inputs)
    for alias in expected - sent:
        feeds[alias] = tensors.to_ndarray(signature.defaults[alias], alias)
    return feeds


def _output_aliases(signature: meta_graph_pb2.SignatureDef, output_filter: Sequence[str]) -> list[str]:
    if not output_filter:
        return sorted(signature.outputs)
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.outputs))}}}."
            )
        if alias in seen:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return list(output_filter)

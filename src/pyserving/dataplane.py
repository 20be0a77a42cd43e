"""The data plane: Predict, Classify, Regress, MultiInference, metadata and status, for REST and gRPC.

Front-ends translate their wire format into these calls and back; everything
TF Serving decides independently of the protocol (servable lookup, signature
checks, input and output_filter validation) lives here. Calls are synchronous
and run on worker threads (see `pyserving.concurrency`), except `predict_async`,
which the front-ends call on the event loop for the hot path.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2, input_pb2, model_pb2, regression_pb2

from pyserving import classification, metrics, tensors
from pyserving.batching import Batcher
from pyserving.concurrency import run_sync
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.manager import Lease, ModelManager, VersionStatus
from pyserving.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, PREDICT_METHOD, REGRESS_METHOD, Servable

SIGNATURE_DEF_FIELD = "signature_def"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""

    @classmethod
    def from_proto(cls, proto: model_pb2.ModelSpec) -> ModelSpec:
        """From the serving API's ModelSpec (its `version_choice` oneof)."""
        choice = proto.WhichOneof("version_choice")
        return cls(name=proto.name,
                   version=proto.version.value if choice == "version" else None,
                   label=proto.version_label if choice == "version_label" else None,
                   signature_name=proto.signature_name)


@dataclass
class PredictResult:
    name: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


@dataclass
class _PredictCall:
    """A checked predict request, ready to run."""

    model: str
    version: int
    signature_name: str
    servable: Servable
    signature: meta_graph_pb2.SignatureDef
    feeds: dict[str, np.ndarray]
    aliases: list[str]

    def result(self, arrays: list[np.ndarray], started: float) -> PredictResult:
        _record_runtime(self.model, "Predict", started)
        return PredictResult(self.model, self.version, self.signature_name, dict(zip(self.aliases, arrays)))


class DataPlane:
    def __init__(self, manager: ModelManager, method_name_check: bool, batcher: Batcher | None = None) -> None:
        self._manager = manager
        self._method_name_check = method_name_check
        self._batcher = batcher

    def lease(self, spec: ModelSpec) -> Lease:
        """The servable `spec` targets, held until the `with` block ends."""
        return self._manager.lease(spec.name, spec.version, spec.label)

    def predict(
        self,
        spec: ModelSpec,
        inputs: dict[str, np.ndarray],
        output_filter: list[str] = (),
        timeout_ms: int = 0,
        target: tuple[int, Servable] | None = None,
    ) -> PredictResult:
        """Run a predict signature; `target` is a (version, servable) the caller already holds."""
        if target is None:
            with self.lease(spec) as leased:
                return self.predict(spec, inputs, output_filter, timeout_ms, leased)
        call = self._predict_call(spec, inputs, output_filter, target)
        started = time.perf_counter()
        arrays = self._run(call.servable, call.signature, call.feeds, call.aliases, timeout_ms)
        return call.result(arrays, started)

    async def predict_async(
        self,
        pool: ThreadPoolExecutor,
        spec: ModelSpec,
        inputs: dict[str, np.ndarray],
        output_filter: list[str] = (),
        timeout_ms: int = 0,
        target: tuple[int, Servable] | None = None,
    ) -> PredictResult:
        """`predict` for the event loop: the session call runs on `pool`, or waits for its batch."""
        if target is None:
            with self.lease(spec) as leased:
                return await self.predict_async(pool, spec, inputs, output_filter, timeout_ms, leased)
        call = self._predict_call(spec, inputs, output_filter, target)
        started = time.perf_counter()
        if self._batcher is not None:
            arrays = await self._batcher.run_async(call.servable, call.signature, call.feeds, call.aliases,
                                                   timeout_ms)
        else:
            arrays = await run_sync(pool, call.servable.run, call.signature, call.feeds, call.aliases, timeout_ms)
        return call.result(arrays, started)

    def _predict_call(self, spec: ModelSpec, inputs: dict[str, np.ndarray], output_filter,
                      target: tuple[int, Servable]) -> _PredictCall:
        """TF Serving's checks of a predict request against the signature, before anything runs."""
        version, servable = target
        key = spec.signature_name or DEFAULT_SIGNATURE
        signature = servable.signature_defs.get(key)
        if signature is None:
            raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.')
        if self._method_name_check and signature.method_name != PREDICT_METHOD:
            raise ServingError(
                Code.INTERNAL,
                f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, "
                f"{CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {signature.method_name}")
        return _PredictCall(spec.name, version, key, servable, signature, _complete_inputs(signature, inputs),
                            _output_aliases(signature, output_filter))

    def classify(self, spec: ModelSpec, request_input: input_pb2.Input, timeout_ms: int = 0,
                 target: tuple[int, Servable] | None = None
                 ) -> tuple[int, str, classification_pb2.ClassificationResult]:
        """Run a classification signature on tf.Examples: (version, signature key, result)."""
        version, key, outputs, count = self._run_examples(
            spec, request_input, timeout_ms, target, classification.check_classify_signature, "Classify")
        return version, key, classification.classification_result(outputs, count)

    def regress(self, spec: ModelSpec, request_input: input_pb2.Input, timeout_ms: int = 0,
                target: tuple[int, Servable] | None = None) -> tuple[int, str, regression_pb2.RegressionResult]:
        """Run a regression signature on tf.Examples: (version, signature key, result)."""
        version, key, outputs, count = self._run_examples(
            spec, request_input, timeout_ms, target, classification.check_regress_signature, "Regress")
        return version, key, classification.regression_result(outputs[classification.OUTPUTS], count)

    def _run_examples(self, spec, request_input, timeout_ms, target, check, api):
        if target is None:
            with self.lease(spec) as leased:
                return self._run_examples(spec, request_input, timeout_ms, leased, check, api)
        version, servable = target
        key = spec.signature_name or DEFAULT_SIGNATURE
        signature = servable.signature_defs.get(key)
        if signature is None:
            raise invalid_argument(f"No signature was found with the name: {key}")
        aliases = check(signature, self._method_name_check)
        examples = classification.serialized_examples(request_input)
        metrics.record_examples(spec.name, len(examples))
        started = time.perf_counter()
        arrays = self._run(servable, signature, {classification.INPUTS: examples}, aliases, timeout_ms)
        _record_runtime(spec.name, api, started)
        return version, key, dict(zip(aliases, arrays)), len(examples)

    def _run(self, servable: Servable, signature, inputs: dict[str, np.ndarray], aliases: list[str],
             timeout_ms: int) -> list[np.ndarray]:
        """One signature run, through the shared batcher when batching is on."""
        if self._batcher is not None:
            return self._batcher.run(servable, signature, inputs, aliases, timeout_ms)
        return servable.run(signature, inputs, aliases, timeout_ms)

    def multi_inference(self, tasks: list[tuple[ModelSpec, str]], request_input: input_pb2.Input,
                        timeout_ms: int = 0, target: tuple[int, Servable] | None = None
                        ) -> tuple[int, list[tuple[str, str, object]]]:
        """Several classify/regress tasks of one model on one input, in one execution.

        `tasks` are (spec, method name); returns the version and, per task, (signature
        key, method name, ClassificationResult or RegressionResult).
        """
        if target is None:
            with self.lease(tasks[0][0] if tasks else ModelSpec("")) as leased:
                return self.multi_inference(tasks, request_input, timeout_ms, leased)
        version, servable = target
        checks = {CLASSIFY_METHOD: classification.check_classify_signature,
                  REGRESS_METHOD: classification.check_regress_signature}
        runs, seen = [], set()
        for spec, method in tasks:
            if not spec.name:
                raise invalid_argument("Found ModelSpec with an empty model name.")
            if spec.name != tasks[0][0].name:
                raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
            key = spec.signature_name or DEFAULT_SIGNATURE
            if key in seen:
                raise invalid_argument(f"Duplicate evaluation of signature: {key}")
            seen.add(key)
            signature = servable.signature_defs.get(key)
            if signature is None:
                raise invalid_argument(f"Requested signature not found in model graph: {key}")
            if method not in checks:
                raise ServingError(Code.UNIMPLEMENTED, f"Unsupported signature method_name: {method}")
            runs.append((key, method, signature, checks[method](signature, self._method_name_check)))
        examples = classification.serialized_examples(request_input)
        metrics.record_examples(tasks[0][0].name, len(examples))
        started = time.perf_counter()
        outputs = servable.run_multi([(signature, aliases) for _, _, signature, aliases in runs],
                                     {classification.INPUTS: examples}, timeout_ms)
        _record_runtime(tasks[0][0].name, "MultiInference", started)
        results = []
        for (key, method, _, aliases), arrays in zip(runs, outputs):
            if method == CLASSIFY_METHOD:
                result = classification.classification_result(dict(zip(aliases, arrays)), len(examples))
            else:
                result = classification.regression_result(arrays[0], len(examples))
            results.append((key, method, result))
        return version, results

    def signature_def_map(self, spec: ModelSpec, fields: list[str]
                          ) -> tuple[int, get_model_metadata_pb2.SignatureDefMap]:
        """GetModelMetadata: only the `signature_def` field exists."""
        if not fields:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != SIGNATURE_DEF_FIELD:
                # TF Serving's message really reads like this (a literal "%s", name appended).
                raise invalid_argument(f"Metadata field %s is not supported{field}")
        with self.lease(spec) as (version, servable):
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for key, signature in servable.signature_defs.items():
                signature_map.signature_def[key].CopyFrom(signature)
        return version, signature_map

    def status(self, name: str, version: int | None) -> list[VersionStatus]:
        return self._manager.status(name, version)


def _record_runtime(model: str, api: str, started: float) -> None:
    """runtime_latency: time inside the session run (the runtime is a TF1-style Session for every model)."""
    metrics.RUNTIME_LATENCY.observe(model, api, "TF1", value=(time.perf_counter() - started) * 1e6)


def _complete_inputs(signature: meta_graph_pb2.SignatureDef, inputs: dict[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
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
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.")
    for alias in extra:
        raise invalid_argument(
            f"input tensor alias not found in signature: {alias}. Inputs expected to be in the set "
            f"{{{','.join(sorted(expected))}}}.")
    if sent == expected:
        return inputs
    feeds = dict(inputs)
    for alias in expected - sent:
        feeds[alias] = tensors.to_ndarray(signature.defaults[alias], alias)
    return feeds


def _output_aliases(signature: meta_graph_pb2.SignatureDef, output_filter) -> list[str]:
    if not output_filter:
        return sorted(signature.outputs)
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.outputs))}}}.")
        if alias in seen:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return list(output_filter)

"""The loader chain: what turns an aspired version into a servable the manager can serve.

runtime load (by `model_platform`, with TF's SavedModel load metrics) ->
Python processing (`--enable_python_processing`: the version folder's processing.py adds
signatures, `runtimes.python_processing`; a pure-Python version is only that) ->
batching wrapper (with `--enable_batching`; per-model parameters from the version
folder's `batching_params.pbtxt`) -> warmup (the version's own warmup requests).
A failure anywhere closes what was loaded and fails the load, so the previous
version keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from pyserving import config_protos, metrics
from pyserving.errors import Code, ServingError
from pyserving.lifecycle.manager import VersionSpec
from pyserving.runtimes import python_processing, registry
from pyserving.runtimes.batching import Batcher, BatchingOptions
from pyserving.runtimes.python_processing import ProcessingServable, ProcessingSettings
from pyserving.runtimes.servable import Servable

__all__ = ["PER_MODEL_BATCHING_FILE", "LoaderChain", "Warmup"]

log = logging.getLogger("pyserving")

PER_MODEL_BATCHING_FILE = "batching_params.pbtxt"

# Replays a version's warmup requests on its servable; raises to fail the load.
Warmup = Callable[[VersionSpec, Servable], None]


class LoaderChain:
    """The manager's `Loader`: runtime load -> Python processing -> batching wrapper -> warmup."""

    def __init__(
        self,
        runtime_options: registry.RuntimeOptions,
        batcher: Batcher | None = None,
        per_model_batching: bool = False,
        warmup: Warmup | None = None,
        processing: ProcessingSettings | None = None,
    ) -> None:
        self._runtime_options = runtime_options
        self._batcher = batcher
        self._per_model_batching = per_model_batching
        self.warmup = warmup  # set after construction when warmup needs the data plane this chain feeds
        self.processing = processing  # --enable_python_processing; None: processing.py is never imported

    def __call__(self, spec: VersionSpec) -> Servable:
        servable = self._load_runtime(spec)
        try:
            processed = servable if isinstance(servable, ProcessingServable) else None
            if self._batcher is not None:
                servable = self._batcher.wrap(servable, self._batching_options(spec.path), spec.model)
            if processed is not None:  # a per-request function's graph calls join the batches
                processed.graph_runner = servable
            if self.warmup is not None:
                self.warmup(spec, servable)
        except BaseException:
            servable.close()
            raise
        return servable

    def _load_runtime(self, spec: VersionSpec) -> Servable:
        """The runtime's load, counted in TF's `load_attempt_count` and `load_latency` as TF Serving does."""
        started = time.monotonic()
        try:
            servable = self._load_with_processing(spec)
        except BaseException:
            metrics.LOAD_ATTEMPT_COUNT.inc(spec.path, "fail")
            raise
        metrics.LOAD_ATTEMPT_COUNT.inc(spec.path, "success")
        metrics.LOAD_LATENCY.inc(spec.path, amount=(time.monotonic() - started) * 1e6)
        return servable

    def _load_with_processing(self, spec: VersionSpec) -> Servable:
        """The runtime's servable, wrapped with the version's processing.py when the flag allows it."""
        file = os.path.join(spec.path, python_processing.FILE)
        if spec.platform == registry.PYTHON_PLATFORM:
            if self.processing is None:
                raise ServingError(
                    Code.FAILED_PRECONDITION,
                    f"{file} is a pure-Python model: it is served only with {python_processing.FLAG} "
                    "(code in a model folder runs with the server's rights)",
                )
            return ProcessingServable(None, spec.model, spec.version, spec.path, self.processing)
        servable = registry.load(spec.platform, spec.path, self._runtime_options)
        if not os.path.isfile(file):
            return servable
        if self.processing is None:
            log.warning(
                "%s is not imported: the server runs without %s; model %s version %d serves its graph's "
                "signatures only",
                file,
                python_processing.FLAG,
                spec.model,
                spec.version,
            )
            return servable
        try:
            return ProcessingServable(servable, spec.model, spec.version, spec.path, self.processing)
        except BaseException:
            servable.close()
            raise

    def _batching_options(self, path: str) -> BatchingOptions | None:
        """`--enable_per_model_batching_parameters`: the version folder's own parameters, if it has them."""
        file = os.path.join(path, PER_MODEL_BATCHING_FILE)
        if not self._per_model_batching or not os.path.exists(file):
            return None
        proto: Any = config_protos.parse_file(file, config_protos.BatchingParameters)
        return BatchingOptions.from_proto(proto, os.cpu_count() or 1)

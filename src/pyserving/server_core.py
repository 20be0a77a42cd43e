"""The server core: model configuration, version lifecycle and the data plane, wired together.

`ServerCore` is what both front-ends serve from. It applies a model config the
way TF Serving's ServerCore does (labels are checked before models are added;
the initial config, and a reload, wait until the new models' versions have
loaded or failed), runs the file-system source and, with
`--model_config_file_poll_wait_seconds`, re-reads the config file.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pyserving import config_protos, metrics, model_config, warmup
from pyserving.batching import Batcher, BatchingOptions
from pyserving.dataplane import DataPlane
from pyserving.errors import Code, ServingError
from pyserving.flags import Options
from pyserving.manager import ModelManager, RetryPolicy
from pyserving.model_config import ModelConfig
from pyserving.runtimes.tf_saved_model import SavedModelServable, session_config
from pyserving.servable import Servable
from pyserving.sources import FileSystemSource

log = logging.getLogger("pyserving")


def initial_configs(options: Options) -> list[ModelConfig]:
    """The models to serve at start-up: the config file if given, else the single-model flags."""
    if options.model_config_file:
        return model_config.from_proto(model_config.read_file(options.model_config_file))
    return model_config.single_model(options.model_name, options.model_base_path)


PER_MODEL_BATCHING_FILE = "batching_params.pbtxt"


def _batcher(options: Options) -> Batcher | None:
    """The shared batcher for `--enable_batching`, from `--batching_parameters_file` or TF Serving's defaults."""
    if not options.enable_batching:
        return None
    if options.batching_parameters_file:
        proto = config_protos.parse_file(options.batching_parameters_file, config_protos.BatchingParameters)
    else:
        proto = config_protos.BatchingParameters()
        proto.thread_pool_name.value = "model_server_batch_threads"
    return Batcher(BatchingOptions.from_proto(proto, os.cpu_count() or 1))


class ServerCore:
    def __init__(self, options: Options) -> None:
        self._options = options
        intra, inter = options.parallelism()
        self._session_config = session_config(intra, inter)
        # TF Serving loads the initial models on 4 threads per CPU, later ones on --num_load_threads.
        self.manager = ModelManager(
            self._load, RetryPolicy(options.max_num_load_retries, max(options.load_retry_interval_micros, 0) / 1e6),
            load_threads=4 * (os.cpu_count() or 1), unload_threads=options.num_unload_threads)
        self.batcher = _batcher(options)
        self.dataplane = DataPlane(self.manager, options.enable_signature_method_name_check, self.batcher)
        self._source = FileSystemSource(self.manager, options.file_system_poll_wait_seconds)
        self._configs: list[ModelConfig] = []
        self.draining = False  # set on SIGTERM: not ready any more
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._config_poller: threading.Thread | None = None

    def _load(self, path: str) -> Servable:
        started = time.monotonic()
        try:
            servable = SavedModelServable(path, self._options.saved_model_tag_list(), self._session_config)
        except BaseException:
            metrics.LOAD_ATTEMPT_COUNT.inc(path, "fail")
            raise
        metrics.LOAD_ATTEMPT_COUNT.inc(path, "success")
        metrics.LOAD_LATENCY.inc(path, amount=(time.monotonic() - started) * 1e6)
        try:
            per_model = os.path.join(path, PER_MODEL_BATCHING_FILE)
            if self.batcher is not None and self._options.enable_per_model_batching_parameters \
                    and os.path.exists(per_model):
                proto = config_protos.parse_file(per_model, config_protos.BatchingParameters)
                self.batcher.set_options(servable, BatchingOptions.from_proto(proto, os.cpu_count() or 1))
            if self._options.enable_model_warmup:
                warmup.replay(path, servable, self.dataplane, self._options.num_request_iterations_for_warmup)
        except BaseException:
            servable.close()
            raise
        return servable

    def start(self, configs: list[ModelConfig]) -> None:
        """Load the initial models (blocking); `ServingError` if any version fails."""
        with self._reload_lock:
            self._apply(configs, initial=True)
        self.manager.use_load_threads(self._options.num_load_threads)
        self._source.start()
        period = self._options.model_config_file_poll_wait_seconds
        if self._options.model_config_file and period > 0:
            self._config_poller = threading.Thread(target=self._poll_config_file, args=(period,),
                                                   name="config-poll", daemon=True)
            self._config_poller.start()

    def reload(self, configs: list[ModelConfig]) -> None:
        """Replace the whole model config (HandleReloadConfigRequest); the old one stays on error."""
        with self._reload_lock:
            self._apply(configs, initial=False)

    def _apply(self, configs: list[ModelConfig], initial: bool) -> None:
        # Labels first, against what serves now: a label may not point at a version
        # this same config is only about to load (TF Serving's order too).
        self.manager.set_labels({c.name: c.labels for c in configs},
                                self._options.allow_version_labels_for_unavailable_models)
        known = {c.name for c in self._configs}
        self._source.set_models(configs)
        if initial:
            for config in configs:
                self._source.wait_for_versions(config)
        self._configs = configs
        failures = self.manager.wait_settled(c.name for c in configs if c.name not in known)
        if failures:
            ids = [f"{{name: {name} version: {status.version}}} due to error: {status.error}"
                   for name, status in failures]
            if initial:
                details = "".join(f"{i}, " for i in ids)
                raise ServingError(Code.UNKNOWN, f"{len(ids)} servable(s) did not become available: {{{details}}}")
            details = "".join(f"{{{i}}}, " for i in ids)
            raise ServingError(Code.UNKNOWN, f"{len(ids)} model(s) did not become available: {{{details}}}")

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when not shutting down and every configured model has an AVAILABLE version."""
        models = {c.name: "AVAILABLE" if self.manager.is_serving(c.name) else "NOT_AVAILABLE" for c in self._configs}
        return not self.draining and all(state == "AVAILABLE" for state in models.values()), models

    def _poll_config_file(self, period: int) -> None:
        path = self._options.model_config_file
        while not self._stop.wait(period):
            try:
                proto = model_config.read_file(path)
            except ServingError as exc:
                log.error("Failed to read ModelServerConfig file: %s", exc.message)
                continue
            try:
                if proto.WhichOneof("config") != "model_config_list":
                    raise ServingError(Code.FAILED_PRECONDITION,
                                       "Cannot transition to requested config. It is only legal to transition "
                                       "from one ModelConfigList to another.")
                configs = model_config.from_proto(proto)
                if configs != self._configs:
                    self.reload(configs)
            except ServingError as exc:
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", exc)

    def stop(self) -> None:
        """Stop polling and batching, unload every version."""
        self._stop.set()
        self._source.stop()
        if self.batcher is not None:
            self.batcher.stop()
        self.manager.unload_all()

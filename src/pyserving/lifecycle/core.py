"""The server core: model configuration and version lifecycle, wired together.

`ServerCore` applies a model config the way TF Serving's ServerCore does (labels
are checked before models are added; the initial config, and a reload, wait
until the new models' versions have loaded or failed), runs the file-system
source and, with `--model_config_file_poll_wait_seconds`, re-reads the config
file (on its own thread, and parsed only when it changed). What a version is
loaded with is the `Loader` it is given.
"""

from __future__ import annotations

import logging
import os
import threading

from tensorflow_serving.config import model_server_config_pb2

from pyserving.concurrency import LoopGuard
from pyserving.errors import Code, ServingError, not_found
from pyserving.flags import Options
from pyserving.lifecycle import model_config, sources
from pyserving.lifecycle.manager import Loader, ModelManager, RetryPolicy
from pyserving.lifecycle.model_config import ConfigFile, ModelConfig
from pyserving.lifecycle.sources import FileSystemSource

__all__ = ["ServerCore"]

log = logging.getLogger("pyserving")


class ServerCore:
    """Owns the model manager and the source that feeds it; applies and reloads model configs."""

    def __init__(self, options: Options, loader: Loader) -> None:
        self._options = options
        # TF Serving loads the initial models on 4 threads per CPU, later ones on --num_load_threads.
        self.manager = ModelManager(
            loader,
            RetryPolicy(options.max_num_load_retries, max(options.load_retry_interval_micros, 0) / 1e6),
            load_threads=4 * (os.cpu_count() or 1),
            unload_threads=options.num_unload_threads,
        )
        self._source = FileSystemSource(self.manager, options.file_system_poll_wait_seconds, options.model_cache_dir)
        self._configs: list[ModelConfig] = []
        self.draining = False  # set on SIGTERM: not ready any more
        self._reload_lock = threading.Lock()
        self._poll_lock = threading.Lock()  # the config-poll thread and SIGHUP
        self._sighup_guard = LoopGuard("Reloading the model config file on SIGHUP")
        self._stop = threading.Event()
        self._config_poller: threading.Thread | None = None
        self.config_file = ConfigFile(options.model_config_file) if options.model_config_file else None
        self._file_configs: list[ModelConfig] | None = None  # the config file's models, None if it is bad
        self._unloaded: dict[str, ModelConfig] = {}  # taken out of the config by `unload_model`

    def initial_configs(self) -> list[ModelConfig]:
        """The models to serve at start-up: the config file if given, else the single-model flags."""
        if self.config_file is None:
            base_path = self._options.model_base_path
            platform = self._options.model_platform or sources.detect_platform(base_path)
            return model_config.single_model(self._options.model_name, base_path, platform)
        self._file_configs = model_config.from_proto(self.config_file.read())
        return self._file_configs

    def start(self, configs: list[ModelConfig]) -> None:
        """Load the initial models (blocking); `ServingError` if any version fails."""
        with self._reload_lock:
            self._apply(configs, initial=True)
        self.manager.use_load_threads(self._options.num_load_threads)
        self._source.start()
        period = self._options.model_config_file_poll_wait_seconds
        if self._options.model_config_file and period > 0:
            self._config_poller = threading.Thread(
                target=self._poll_config_file, args=(period,), name="config-poll", daemon=True
            )
            self._config_poller.start()

    def reload(self, configs: list[ModelConfig]) -> None:
        """Replace the whole model config; the old one stays on error."""
        with self._reload_lock:
            self._apply(configs, initial=False)

    def reload_proto(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """`reload` from a ModelServerConfig message (HandleReloadConfigRequest), validated as a config file is."""
        self.reload(model_config.from_proto(config))

    def _apply(self, configs: list[ModelConfig], initial: bool) -> None:
        # Labels first, against what serves now: a label may not point at a version
        # this same config is only about to load (TF Serving's order too).
        self.manager.set_labels(
            {c.name: c.labels for c in configs}, self._options.allow_version_labels_for_unavailable_models
        )
        known = {c.name for c in self._configs}
        self._source.set_models(configs)
        if initial:
            for config in configs:
                self._source.wait_for_versions(config)
        self._configs = configs
        self.manager.notify_change()  # readiness and the model names follow the config
        failures = self.manager.wait_settled(c.name for c in configs if c.name not in known)
        if failures:
            # TF Serving's load_servables_fast.cc (initial) and server_core.cc (reload): each failure is
            # "{" + "{name: N version: V}" + " due to error: " + status + "}, ", all of them inside "{...}".
            details = "".join(
                f"{{{{name: {name} version: {status.version}}} due to error: {status.error}}}, "
                for name, status in failures
            )
            what = "servable(s)" if initial else "model(s)"
            raise ServingError(Code.UNKNOWN, f"{len(failures)} {what} did not become available: {{{details}}}")

    def model_names(self) -> list[str]:
        """Every model of the config, and those `unload_model` took out of it, sorted."""
        return sorted({c.name for c in self._configs} | set(self._unloaded))

    def unload_model(self, name: str) -> None:
        """Take `name` out of the model config (its versions unload once their last requests end); NOT_FOUND
        if it is not in it. Like a gRPC ReloadConfig, a later change of --model_config_file replaces this."""
        with self._reload_lock:
            removed = [c for c in self._configs if c.name == name]
            if not removed:
                if name in self._unloaded:
                    return
                raise not_found(f"Model {name} is not in the model config")
            self._apply([c for c in self._configs if c.name != name], initial=False)
            self._unloaded[name] = removed[0]

    def load_model(self, name: str) -> None:
        """Put `name` back in the model config (as it was before `unload_model`, or as the config file has
        it) and wait until its versions loaded; NOT_FOUND for a model neither knows, a load failure's error."""
        with self._reload_lock:
            if any(c.name == name for c in self._configs):
                return
            config = self._unloaded.get(name) or next((c for c in self._file_configs or () if c.name == name), None)
            if config is None:
                raise not_found(f"Model {name} is neither in the model config nor was unloaded from it")
            self._unloaded.pop(name, None)
            self._apply([*self._configs, config], initial=False)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when not shutting down and every configured model has an AVAILABLE version."""
        models = {c.name: "AVAILABLE" if self.manager.is_serving(c.name) else "NOT_AVAILABLE" for c in self._configs}
        return not self.draining and all(state == "AVAILABLE" for state in models.values()), models

    def _poll_config_file(self, period: int) -> None:
        guard = LoopGuard("Polling the model config file")
        while not self._stop.wait(period):
            with guard:
                self.poll_config_file()

    def reload_config_file(self) -> None:
        """SIGHUP: poll `--model_config_file` now (failures are logged; what serves stays)."""
        with self._sighup_guard:
            self.poll_config_file()

    def poll_config_file(self) -> None:
        """One poll of `--model_config_file` (the config-poll thread, SIGHUP): parse it if it changed, then
        apply its models unless they are what serves. An unchanged file is applied again when a reload
        failed or a gRPC reload replaced it, as TF Serving does; a bad one changes nothing."""
        if self.config_file is None:
            return
        with self._poll_lock:
            self._poll_config_file_once(self.config_file)

    def _poll_config_file_once(self, config_file: ConfigFile) -> None:
        try:
            proto = config_file.read_if_changed()
        except ServingError as exc:
            self._file_configs = None
            log.error("Failed to read ModelServerConfig file: %s", exc.message)
            return
        try:
            if proto is not None:
                self._file_configs = None
                if proto.WhichOneof("config") != "model_config_list":
                    raise ServingError(
                        Code.FAILED_PRECONDITION,
                        "Cannot transition to requested config. It is only legal to transition "
                        "from one ModelConfigList to another.",
                    )
                self._file_configs = model_config.from_proto(proto)
            if self._file_configs is not None and self._file_configs != self._configs:
                self.reload(self._file_configs)
        except ServingError as exc:
            log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", exc)

    def stop(self) -> None:
        """Stop polling, unload every version."""
        self._stop.set()
        self._source.stop()
        self.manager.unload_all()

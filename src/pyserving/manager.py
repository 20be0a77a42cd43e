"""The model manager: which versions of which models are loaded, in which state.

It owns the version state machine TF Serving reports (START -> LOADING ->
AVAILABLE -> UNLOADING -> END; a failed load ends in END with its error) and
answers the two questions every request asks: which servable serves this
(model, version | label), and what is each version's status.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyserving.errors import Code, ServingError, invalid_argument, not_found
from pyserving.servable import Servable

log = logging.getLogger("pyserving")


class State(enum.IntEnum):
    """ModelVersionStatus.State numbers."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass
class VersionStatus:
    version: int
    state: State
    error: ServingError | None = None


@dataclass
class _Version:
    status: VersionStatus
    servable: Servable | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """`--max_num_load_retries` and `--load_retry_interval_micros`."""

    max_retries: int = 5
    interval_s: float = 60.0


Loader = Callable[[str], Servable]


class ModelManager:
    """Thread-safe registry of model versions and their servables."""

    def __init__(self, retry: RetryPolicy) -> None:
        self._retry = retry
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, _Version]] = {}
        self._labels: dict[str, dict[str, int]] = {}

    def add_model(self, name: str) -> None:
        with self._lock:
            self._models.setdefault(name, {})
            self._labels.setdefault(name, {})

    def load(self, name: str, version: int, path: str, loader: Loader) -> VersionStatus:
        """Load one version (blocking, retried per policy); it serves once AVAILABLE."""
        record = _Version(VersionStatus(version, State.START))
        with self._lock:
            self._models.setdefault(name, {})[version] = record
        log.info("Loading servable version {name: %s version: %d}", name, version)
        record.status.state = State.LOADING
        attempt = 0
        while True:
            try:
                started = time.monotonic()
                servable = loader(path)
            except ServingError as exc:
                error = exc
            except Exception as exc:  # a runtime bug must not take the server down
                error = ServingError(Code.UNKNOWN, f"{type(exc).__name__}: {exc}")
            else:
                record.servable = servable
                record.status.state = State.AVAILABLE
                log.info("Successfully loaded servable version {name: %s version: %d} in %.2f s",
                         name, version, time.monotonic() - started)
                return record.status
            log.error("Loading servable: {name: %s version: %d} failed: %s", name, version, error)
            if attempt >= self._retry.max_retries:
                break
            attempt += 1
            log.info("Retrying load of servable {name: %s version: %d} (retry %d of %d)",
                     name, version, attempt, self._retry.max_retries)
            if self._retry.interval_s > 0:
                time.sleep(self._retry.interval_s)
        record.status.state = State.END
        record.status.error = error
        return record.status

    def unload_all(self) -> None:
        """Close every loaded servable (server shutdown)."""
        with self._lock:
            records = [r for versions in self._models.values() for r in versions.values()]
        for record in records:
            if record.servable is not None:
                record.status.state = State.UNLOADING
                servable, record.servable = record.servable, None
                servable.close()
                record.status.state = State.END

    def servable(self, name: str, version: int | None = None, label: str | None = None
                 ) -> tuple[int, Servable]:
        """The (version, servable) a request targets; TF Serving's lookup errors otherwise."""
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        versions = self._models.get(name)
        if label is not None:
            labels = self._labels.get(name, {})
            if label not in labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = labels[label]
        if version is not None:
            record = versions.get(version) if versions else None
            if record is None or record.servable is None:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return version, record.servable
        if versions:
            for v in sorted(versions, reverse=True):
                servable = versions[v].servable
                if servable is not None:
                    return v, servable
        raise not_found(f"Servable not found for request: Latest({name})")

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Statuses, highest version first, END versions included."""
        versions = self._models.get(name)
        if not versions:
            raise not_found(f"Could not find any versions of model {name}")
        if version is not None:
            if version not in versions:
                raise not_found(f"Could not find version {version} of model {name}")
            return [versions[version].status]
        return [versions[v].status for v in sorted(versions, reverse=True)]

"""The model manager: which versions of which models are loaded, in which state.

A source tells the manager which versions each model *aspires* to (the folders a
version policy selects); the manager reconciles that with what is loaded, the
way TF Serving's AspiredVersionsManager does with its availability-preserving
policy: new versions load while the old ones keep serving, and an un-aspired
version is unloaded only once an aspired version is AVAILABLE (or nothing is
aspired any more). A version that fails to load never takes a working one down.

States follow TF Serving (START -> LOADING -> AVAILABLE -> UNLOADING -> END; a
failed load ends in END with its error) and END versions stay listed. Requests
take a `Lease` on a servable; a version is closed only after its last lease ends.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyserving.concurrency import submit_logged, worker_pool
from pyserving.errors import Code, ServingError, invalid_argument, not_found
from pyserving.runtimes.servable import Servable

__all__ = ["Lease", "Loader", "ModelManager", "RetryPolicy", "State", "VersionSpec", "VersionStatus"]

log = logging.getLogger("pyserving")


class State(enum.IntEnum):
    """ModelVersionStatus.State numbers."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


_SETTLING = (State.START, State.LOADING)


@dataclass
class VersionStatus:
    """A version's state and, for a failed load, its error: the one status model every protocol renders."""

    version: int
    state: State
    error: ServingError | None = None


@dataclass(frozen=True)
class VersionSpec:
    """One version a source aspires to serve: what the loader needs to load it."""

    model: str
    version: int
    path: str
    platform: str


@dataclass(frozen=True)
class RetryPolicy:
    """`--max_num_load_retries` and `--load_retry_interval_micros`."""

    max_retries: int = 5
    interval_s: float = 60.0


Loader = Callable[[VersionSpec], Servable]


@dataclass(eq=False)
class _Version:
    """One load of one version folder."""

    status: VersionStatus
    spec: VersionSpec
    servable: Servable | None = None
    leases: int = 0
    # Set when the version stops being aspired: ends load retries, allows a reload later.
    retired: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Model:
    aspired: dict[int, VersionSpec] = field(default_factory=dict)
    versions: dict[int, _Version] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    announced: tuple[tuple[int, State], ...] = ()  # the versions' states `on_change` last told of


class Lease:
    """An AVAILABLE version checked out by one request; it is not closed before `release()`."""

    __slots__ = ("version", "platform", "servable", "_manager", "_record")

    def __init__(self, manager: ModelManager, record: _Version, servable: Servable) -> None:
        self.version = record.status.version
        self.platform = record.spec.platform
        self.servable = servable
        self._manager = manager
        self._record = record

    def release(self) -> None:
        self._manager._release(self._record)


class ModelManager:
    """Thread-safe registry of model versions; loads and unloads on its own thread pools."""

    def __init__(self, loader: Loader, retry: RetryPolicy, load_threads: int, unload_threads: int) -> None:
        self._loader = loader
        self._retry = retry
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._models: dict[str, _Model] = {}
        self._load_pool = worker_pool(load_threads, "load")
        self._unload_pool = worker_pool(unload_threads, "unload")
        self._stopping = False
        self._source_errors: dict[str, str] = {}  # model -> why its source could not list its versions
        # Called (lock held) whenever a version's state or the labels may have changed what a lease resolves
        # to: `--num_workers` bumps the generation the workers' resolve caches are keyed on.
        self.on_change: Callable[[], None] | None = None

    def use_load_threads(self, load_threads: int) -> None:
        """Switch to the steady-state load pool (TF Serving loads the initial models wider)."""
        old, self._load_pool = self._load_pool, worker_pool(load_threads, "load")
        old.shutdown(wait=False)

    # -- what a source says -------------------------------------------------

    def set_aspired(self, name: str, versions: dict[int, VersionSpec]) -> None:
        """The versions `name` should serve now; {} unloads them all."""
        with self._lock:
            model = self._models.setdefault(name, _Model())
            model.aspired = dict(versions)
            for version, record in model.versions.items():
                if version not in versions:
                    record.retired.set()
                elif record.status.state != State.END:
                    record.retired.clear()
            self._reconcile(name, model)

    def _reconcile(self, name: str, model: _Model) -> None:
        """Start the loads and unloads that move `model` toward its aspired versions (lock held)."""
        if self._stopping:
            return
        for version in sorted(model.aspired, reverse=True):
            record = model.versions.get(version)
            if record is not None and not (record.status.state == State.END and record.retired.is_set()):
                continue  # loading, serving, unloading, or failed while still aspired
            record = _Version(VersionStatus(version, State.START), model.aspired[version])
            model.versions[version] = record
            log.info("Approving load for servable version {name: %s version: %d}", name, version)
            submit_logged(self._load_pool, f"Loading {name} version {version}", self._load, name, record)
        retiring = sorted(
            v for v, r in model.versions.items() if v not in model.aspired and r.status.state == State.AVAILABLE
        )
        aspired_ready = any(
            model.versions[v].status.state == State.AVAILABLE for v in model.aspired if v in model.versions
        )
        if retiring and model.aspired and not aspired_ready:
            retiring.pop()  # nothing aspired serves yet: the newest retiring version keeps serving
        for version in retiring:
            record = model.versions[version]
            log.info("Quiescing servable version {name: %s version: %d}", name, version)
            record.status.state = State.UNLOADING
            submit_logged(self._unload_pool, f"Unloading {name} version {version}", self._unload, name, record)
        self._changed.notify_all()
        if self.on_change is not None:  # only for a real change: every poll of an unchanged folder lands here
            states = tuple((version, record.status.state) for version, record in model.versions.items())
            if states != model.announced:
                model.announced = states
                self.on_change()

    def _load(self, name: str, record: _Version) -> None:
        version = record.status.version
        with self._lock:
            record.status.state = State.LOADING
            self._changed.notify_all()
        log.info("Loading servable version {name: %s version: %d}", name, version)
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                servable = self._loader(record.spec)
            except ServingError as exc:
                error = exc
            except Exception:  # a runtime bug must not take the server down
                log.exception("Unexpected error loading %s", record.spec.path)
                error = ServingError(Code.UNKNOWN, f"Unexpected error loading {record.spec.path}; see the server log")
            else:
                self._finish_load(name, record, servable)
                log.info(
                    "Successfully loaded servable version {name: %s version: %d} (%.2f s)",
                    name,
                    version,
                    time.monotonic() - started,
                )
                return
            log.error("Loading servable: {name: %s version: %d} failed: %s", name, version, error)
            if attempt >= self._retry.max_retries or record.retired.wait(self._retry.interval_s):
                break
            attempt += 1
            log.info("Retrying of Loading servable: {name: %s version: %d} retry: %d", name, version, attempt)
        log.error("Servable {name: %s version: %d} cannot be loaded: %s", name, version, error)
        with self._lock:
            record.status.state = State.END
            record.status.error = error
            self._reconcile(name, self._models[name])

    def _finish_load(self, name: str, record: _Version, servable: Servable) -> None:
        with self._lock:
            if self._stopping:
                record.status.state = State.END
                self._changed.notify_all()
            else:
                record.servable = servable
                record.status.state = State.AVAILABLE
                self._reconcile(name, self._models[name])
                return
        servable.close()

    def _unload(self, name: str, record: _Version) -> None:
        """Close a version once its last lease ends (its state is already UNLOADING)."""
        with self._lock:
            while record.leases:
                self._changed.wait()
            servable, record.servable = record.servable, None
        log.info("Unloading servable version {name: %s version: %d}", name, record.status.version)
        try:
            if servable is not None:
                servable.close()
        except Exception:
            log.exception("Error closing %s", record.spec.path)
        with self._lock:
            record.status.state = State.END
            self._reconcile(name, self._models[name])
        log.info("Done unloading servable version {name: %s version: %d}", name, record.status.version)

    def wait_settled(self, names: Iterable[str]) -> list[tuple[str, VersionStatus]]:
        """Block until no aspired version of `names` is still loading; return those that failed."""
        names = list(names)
        with self._lock:
            while True:
                records = [
                    self._models[n].versions[v]
                    for n in names
                    if n in self._models
                    for v in self._models[n].aspired
                    if v in self._models[n].versions
                ]
                if self._stopping or not any(r.status.state in _SETTLING for r in records):
                    break
                self._changed.wait()
            return [
                (n, r.status)
                for n in names
                if n in self._models
                for v, r in sorted(self._models[n].versions.items(), reverse=True)
                if v in self._models[n].aspired and r.status.state == State.END and r.status.error
            ]

    def unload_all(self) -> None:
        """Server shutdown: stop loading, close every servable."""
        with self._lock:
            self._stopping = True
            records = [r for model in self._models.values() for r in model.versions.values()]
            for record in records:
                record.retired.set()
            self._changed.notify_all()
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        self._unload_pool.shutdown(wait=True)
        for record in records:
            if record.servable is not None:
                record.status.state = State.UNLOADING
                servable, record.servable = record.servable, None
                servable.close()
                record.status.state = State.END

    def set_source_error(self, name: str, error: str | None) -> None:
        """Why the source could not list `name`'s versions (None: it could); shown by `status` while the model
        has no version."""
        with self._lock:
            if error is None:
                self._source_errors.pop(name, None)
            else:
                self._source_errors[name] = error

    # -- labels ---------------------------------------------------------------

    def set_labels(self, labels: dict[str, dict[str, int]], allow_unavailable: bool) -> None:
        """Replace every model's labels, all or nothing, with TF Serving's availability rule.

        A label may point to an AVAILABLE version; with `allow_unavailable` also to
        one that is not (yet), but only if the label is new or keeps its version:
        moving a live label to a version that cannot serve would drop its traffic.
        """
        with self._lock:
            for name, model_labels in labels.items():
                model = self._models.get(name)
                current = model.labels if model else {}
                for label, version in sorted(model_labels.items()):
                    record = model.versions.get(version) if model else None
                    if record is not None and record.status.state == State.AVAILABLE:
                        continue
                    if allow_unavailable and current.get(label, version) == version:
                        continue
                    raise ServingError(
                        Code.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model {name}, which is not "
                        "currently available for inference",
                    )
            for model in self._models.values():
                model.labels = {}
            for name, model_labels in labels.items():
                self._models.setdefault(name, _Model()).labels = dict(model_labels)
            if self.on_change is not None:
                self.on_change()

    # -- what requests ask ----------------------------------------------------

    def lease(self, name: str, version: int | None = None, label: str | None = None) -> Lease:
        """Check out the servable a request targets (the latest AVAILABLE version unless a version or
        label is given); TF Serving's lookup errors otherwise."""
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        with self._lock:
            model = self._models.get(name)
            if label is not None:
                if model is None or label not in model.labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = model.labels[label]
            record = None
            if model is not None:
                if version is not None:
                    record = model.versions.get(version)
                else:  # the latest AVAILABLE version (a plain loop: this runs on every request)
                    for candidate in model.versions.values():
                        if candidate.status.state == State.AVAILABLE and (
                            record is None or candidate.status.version > record.status.version
                        ):
                            record = candidate
            if record is None or record.status.state != State.AVAILABLE or record.servable is None:
                request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
                raise not_found(f"Servable not found for request: {request}")
            record.leases += 1
        return Lease(self, record, record.servable)

    def leases_by_model(self) -> dict[tuple[str, ...], float]:
        """Each configured model's leases held now, as `(name,)` -> count: the requests in flight on it
        (`metrics.REQUESTS_IN_FLIGHT` reads this when scraped)."""
        with self._lock:
            return {
                (name,): float(sum(record.leases for record in model.versions.values()))
                for name, model in self._models.items()
            }

    def knows(self, name: str) -> bool:
        """Whether `name` is (or was) a configured model, served or not."""
        with self._lock:
            return name in self._models

    def notify_change(self) -> None:
        """Call `on_change` for a change the manager cannot see (the core's model config)."""
        with self._lock:
            if self.on_change is not None:
                self.on_change()

    def names(self) -> list[str]:
        """Every model `knows` answers true for, sorted."""
        with self._lock:
            return sorted(self._models)

    def is_serving(self, name: str) -> bool:
        """Whether `name` has an AVAILABLE version."""
        with self._lock:
            model = self._models.get(name)
            return model is not None and any(r.status.state == State.AVAILABLE for r in model.versions.values())

    def _release(self, record: _Version) -> None:
        with self._lock:
            record.leases -= 1
            if not record.leases and record.status.state == State.UNLOADING:
                self._changed.notify_all()

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Statuses, highest version first, END versions included."""
        with self._lock:
            model = self._models.get(name)
            if model is None or not model.versions:
                error = self._source_errors.get(name)
                raise not_found(f"Could not find any versions of model {name}" + (f": {error}" if error else ""))
            if version is not None:
                if version not in model.versions:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [_copy(model.versions[version].status)]
            return [_copy(model.versions[v].status) for v in sorted(model.versions, reverse=True)]


def _copy(status: VersionStatus) -> VersionStatus:
    return VersionStatus(status.version, status.state, status.error)

"""Version discovery: which numeric version folders exist under each model's base path.

`FileSystemSource` polls every `--file_system_poll_wait_seconds` and tells the
manager, per model, the versions its policy aspires to; the manager does the rest.
A base path on an object store (`s3://`, `gs://`, `az://`) is listed through
`storage.RemoteStore`, and its aspired versions are copied into the local cache
(on the polling thread) before the manager is told their cache folders.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection

from pyserving.concurrency import LoopGuard
from pyserving.errors import Code, ServingError
from pyserving.lifecycle import storage
from pyserving.lifecycle.manager import ModelManager, State, VersionSpec
from pyserving.lifecycle.model_config import ModelConfig, VersionPolicy
from pyserving.runtimes import registry

__all__ = [
    "FileSystemSource",
    "aspired_versions",
    "detect_platform",
    "list_versions",
    "parse_version",
    "version_entries",
]

log = logging.getLogger("pyserving")

_MAX_VERSION = 2**63 - 1


def parse_version(name: str) -> int | None:
    """`00000123` -> 123, like absl::SimpleAtoi on a folder name; None if not a version."""
    text = name.strip()
    if text.startswith("+"):
        text = text[1:]
    if not text.isascii() or not text.isdigit():
        return None
    version = int(text)
    return version if version <= _MAX_VERSION else None


def version_entries(base_path: str) -> list[tuple[int, str]]:
    """(version, path) of every child whose name is a version number, in name order; OSError if unreadable."""
    return [
        (version, os.path.join(base_path, entry))
        for entry in sorted(os.listdir(base_path))
        if (version := parse_version(entry)) is not None
    ]


def detect_platform(base_path: str) -> str:
    """`--model_platform` left empty: the platform of the newest version folder a runtime recognises
    (`registry.detect`; for an object store, the marker names in its listing). Read once, at start-up: a base
    path that is still empty (the server waits for it) serves TensorFlow models, as TF Serving does."""
    if storage.is_remote(base_path):
        return storage.detect_platform(base_path)
    try:
        entries = version_entries(base_path)
    except OSError:
        return registry.TENSORFLOW_PLATFORM
    for _, path in sorted(entries, reverse=True):
        platform = registry.detect(path)
        if platform is not None:
            return platform
    return registry.TENSORFLOW_PLATFORM


def list_versions(model_name: str, base_path: str) -> dict[int, str] | None:
    """Numeric children of `base_path` as {version: path}; None (logged) if the base path is missing."""
    try:
        entries = version_entries(base_path)
    except OSError as exc:
        log.error(
            "FileSystemStoragePathSource encountered a filesystem access error: Could not find base path %s "
            "for servable %s with error %s",
            base_path,
            model_name,
            exc.strerror or exc,
        )
        return None
    found: dict[int, str] = {}
    for version, path in entries:
        if version in found:
            log.warning(
                "Duplicate version directories detected. Version %d will be loaded from %s, %s will be ignored.",
                version,
                found[version],
                path,
            )
            continue
        found[version] = path
    if not found:
        log.warning(
            "No versions of servable %s found under base path %s. Did you forget to name your "
            "leaf directory as a number (eg. '/1/')?",
            model_name,
            base_path,
        )
    return found


def aspired_versions(found: Collection[int], policy: VersionPolicy) -> list[int]:
    """The versions a policy wants loaded, highest first."""
    if policy.kind == "all":
        chosen = list(found)
    elif policy.kind == "specific":
        chosen = [v for v in policy.versions if v in found]
    else:
        chosen = sorted(found, reverse=True)[: max(policy.num_versions, 1)]
    return sorted(chosen, reverse=True)


class FileSystemSource:
    """Polls the base paths of the configured models and feeds their aspired versions to the manager.

    A missing base path changes nothing (what serves keeps serving); an existing
    one without version folders un-aspires everything, as in TF Serving.
    """

    def __init__(self, manager: ModelManager, poll_wait_s: float, cache_dir: str = "") -> None:
        self._manager = manager
        self._poll_wait_s = poll_wait_s
        self._remote = storage.RemoteStore(cache_dir)
        # (model, remote base path) -> the versions last aspired from it; their cache folders stay
        self._remote_aspired: dict[tuple[str, str], set[int]] = {}
        self._models: dict[str, ModelConfig] = {}
        self._lock = threading.Lock()  # one poll or reconfiguration at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_models(self, configs: list[ModelConfig]) -> None:
        """Monitor exactly `configs`; models no longer listed are un-aspired, new or changed ones polled now."""
        with self._lock:
            old, self._models = self._models, {c.name: c for c in configs}
            for name in old.keys() - self._models.keys():
                self._manager.set_aspired(name, {})
            for name, config in old.items():
                if (name, config.base_path) in self._remote_aspired and self._models.get(name) != config:
                    self._remote_aspired[name, config.base_path] = set()  # evicted once unloaded
                    self._remote.forget(name, config.base_path)
            for config in configs:
                if old.get(config.name) != config:
                    self._poll(config)

    def wait_for_versions(self, config: ModelConfig) -> None:
        """Start-up: poll `config` until its base path holds a version folder (TF Serving waits too). A remote
        version is complete only once two listings agree: without polling, the second listing comes a second
        after the first."""
        remote_tries = 2 if storage.is_remote(config.base_path) else 1
        while True:
            with self._lock:
                if self._poll(config):
                    return
            remote_tries -= 1
            if self._poll_wait_s <= 0 and remote_tries > 0:
                time.sleep(1)
                continue
            if self._poll_wait_s <= 0:
                raise ServingError(
                    Code.NOT_FOUND,
                    f"No versions of servable {config.name} found under base path {config.base_path} "
                    "and --file_system_poll_wait_seconds does not poll again.",
                )
            time.sleep(self._poll_wait_s)

    def _poll(self, config: ModelConfig) -> bool:
        """Look at one base path (lock held); True if it holds versions."""
        if storage.is_remote(config.base_path):
            return self._poll_remote(config)
        found = list_versions(config.name, config.base_path)
        if found is None:
            return False
        chosen = aspired_versions(found, config.policy)
        if config.policy.kind == "specific":
            for version in sorted(set(config.policy.versions) - set(chosen)):
                log.warning(
                    "Version %d of servable %s, which was requested to be served as a 'specific' version "
                    "in the servable's version policy, was not found in the file system",
                    version,
                    config.name,
                )
        self._manager.set_aspired(
            config.name, {v: VersionSpec(config.name, v, found[v], config.platform) for v in chosen}
        )
        return bool(found)

    def _poll_remote(self, config: ModelConfig) -> bool:
        """`_poll` for an object store: list, keep the complete versions, cache the aspired ones (lock held).
        A failed listing changes nothing that serves: it is logged, shown by the model's status while it has
        no version, and retried at the next poll."""
        name, url = config.name, config.base_path
        try:
            complete = self._remote.complete_versions(name, url)
        except storage.StorageError as exc:
            log.error(
                "FileSystemStoragePathSource encountered a filesystem access error: Could not list base path %s "
                "for servable %s with error %s",
                url,
                name,
                exc,
            )
            self._manager.set_source_error(name, f"Could not list base path {url}: {exc}")
            return False
        copy_error = ""
        # The policy chooses among the complete versions; one that cannot be copied now is left out (and the
        # policy chooses again), so a failed download never un-aspires what serves.
        candidates = dict(complete)
        paths: dict[int, str] = {}
        while True:
            chosen = aspired_versions(candidates, config.policy)
            missing = [v for v in chosen if v not in paths]
            if not missing:
                break
            for version in missing:
                try:
                    paths[version] = self._remote.ensure_cached(name, url, version, candidates[version])
                except (storage.StorageError, OSError) as exc:
                    log.error("Could not copy version %d of servable %s from %s: %s", version, name, url, exc)
                    copy_error = f"Could not copy version {version} from {url}: {exc}"
                    del candidates[version]
        self._manager.set_source_error(name, copy_error if not chosen and copy_error else None)
        if not chosen and (name, url) in self._remote_aspired:
            # Nothing complete (or copyable) now: what serves keeps serving, as for a missing local base path.
            return bool(self._remote_aspired[name, url])
        self._remote_aspired[name, url] = set(chosen)
        self._manager.set_aspired(name, {v: VersionSpec(name, v, paths[v], config.platform) for v in chosen})
        return bool(chosen)

    def _evict_unloaded(self) -> None:
        """Remove the cache folders of remote versions no longer aspired once the manager unloaded them."""
        for (name, url), aspired in list(self._remote_aspired.items()):
            stale = [v for v in self._remote.cached_versions(name, url) if v not in aspired]
            if not stale:
                if not aspired:
                    del self._remote_aspired[name, url]
                continue
            try:
                states = {s.version: s.state for s in self._manager.status(name)}
            except ServingError:
                states = {}
            for version in stale:
                if states.get(version, State.END) == State.END:
                    self._remote.evict(name, url, version)

    def start(self) -> None:
        """Poll in the background every `poll_wait_s` seconds (0 or less: never again)."""
        if self._poll_wait_s > 0:
            self._thread = threading.Thread(target=self._run, name="fs-poll", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        guards: dict[str, LoopGuard] = {}  # one per model: a failing one does not keep the others from polling
        evict_guard = LoopGuard("Removing cached versions")
        while not self._stop.wait(self._poll_wait_s):
            with self._lock:
                configs = list(self._models.values())
                guards = {c.name: guards.get(c.name) or LoopGuard(f"Polling the versions of {c.name}") for c in configs}
                for config in configs:
                    with guards[config.name]:
                        self._poll(config)
                with evict_guard:
                    self._evict_unloaded()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A poll stuck on an unreachable object store must not hold the shutdown (the thread is a daemon).
            self._thread.join(5)
            if self._thread.is_alive():
                log.warning("The version poll is still running (a slow store?); shutting down without it")

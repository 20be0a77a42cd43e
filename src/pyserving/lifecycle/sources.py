"""Version discovery: which numeric version folders exist under each model's base path.

`FileSystemSource` polls every `--file_system_poll_wait_seconds` and tells the
manager, per model, the versions its policy aspires to; the manager does the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pyserving.concurrency import LoopGuard
from pyserving.errors import Code, ServingError
from pyserving.lifecycle.manager import ModelManager, VersionSpec
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
    (`registry.detect`). Read once, at start-up: a base path that is still empty (the server waits for it)
    serves TensorFlow models, as TF Serving does."""
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


def aspired_versions(found: dict[int, str], policy: VersionPolicy) -> list[int]:
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

    def __init__(self, manager: ModelManager, poll_wait_s: float) -> None:
        self._manager = manager
        self._poll_wait_s = poll_wait_s
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
            for config in configs:
                if old.get(config.name) != config:
                    self._poll(config)

    def wait_for_versions(self, config: ModelConfig) -> None:
        """Start-up: poll `config` until its base path holds a version folder (TF Serving waits too)."""
        while True:
            with self._lock:
                if self._poll(config):
                    return
            if self._poll_wait_s <= 0:
                raise ServingError(
                    Code.NOT_FOUND,
                    f"No versions of servable {config.name} found under base path {config.base_path} "
                    "and --file_system_poll_wait_seconds does not poll again.",
                )
            time.sleep(self._poll_wait_s)

    def _poll(self, config: ModelConfig) -> bool:
        """Look at one base path (lock held); True if it holds versions."""
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

    def start(self) -> None:
        """Poll in the background every `poll_wait_s` seconds (0 or less: never again)."""
        if self._poll_wait_s > 0:
            self._thread = threading.Thread(target=self._run, name="fs-poll", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        guards: dict[str, LoopGuard] = {}  # one per model: a failing one does not keep the others from polling
        while not self._stop.wait(self._poll_wait_s):
            with self._lock:
                configs = list(self._models.values())
                guards = {c.name: guards.get(c.name) or LoopGuard(f"Polling the versions of {c.name}") for c in configs}
                for config in configs:
                    with guards[config.name]:
                        self._poll(config)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

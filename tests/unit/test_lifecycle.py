"""Version folders, version policies, and the manager's availability-preserving loads and unloads."""

from __future__ import annotations

import os
import threading
import time

import pytest
from helpers import DoublingServable

from pyserving import flags
from pyserving.errors import Code, ServingError
from pyserving.lifecycle import model_config
from pyserving.lifecycle.core import ServerCore
from pyserving.lifecycle.manager import ModelManager, RetryPolicy, State, VersionSpec
from pyserving.lifecycle.model_config import ConfigFile, ModelConfig, VersionPolicy
from pyserving.lifecycle.sources import FileSystemSource, aspired_versions, list_versions, parse_version


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("1", 1),
        ("00000123", 123),
        ("+7", 7),
        (" 8 ", 8),
        ("x1", None),
        ("-1", None),
        ("1.5", None),
        ("٣", None),
        (str(2**63), None),
        (str(2**63 - 1), 2**63 - 1),
    ],
)
def test_version_folder_names(name, version):
    assert parse_version(name) == version


def test_list_versions_and_policies(tmp_path):
    for name in ("1", "00000002", "10", "notes", "3"):
        (tmp_path / name).mkdir()
    found = list_versions("m", str(tmp_path))
    assert sorted(found) == [1, 2, 3, 10]
    assert found[2] == str(tmp_path / "00000002")
    assert aspired_versions(found, VersionPolicy()) == [10]
    assert aspired_versions(found, VersionPolicy("latest", num_versions=2)) == [10, 3]
    assert aspired_versions(found, VersionPolicy("all")) == [10, 3, 2, 1]
    assert aspired_versions(found, VersionPolicy("specific", versions=(2, 7))) == [2]
    assert list_versions("m", str(tmp_path / "missing")) is None


class _Loads:
    """A loader of DoublingServables that fails the versions it is told to, counting attempts."""

    def __init__(self, failing: set[int] = frozenset()) -> None:
        self.failing = set(failing)
        self.attempts: dict[int, int] = {}
        self.servables: dict[int, DoublingServable] = {}

    def __call__(self, spec: VersionSpec) -> DoublingServable:
        self.attempts[spec.version] = self.attempts.get(spec.version, 0) + 1
        if spec.version in self.failing:
            raise ServingError(Code.NOT_FOUND, f"no model at {spec.path}")
        self.servables[spec.version] = DoublingServable()
        return self.servables[spec.version]


def _manager(loader, retries: int = 0) -> ModelManager:
    return ModelManager(loader, RetryPolicy(retries, 0.01), load_threads=2, unload_threads=1)


def _aspire(manager: ModelManager, name: str, *versions: int) -> None:
    manager.set_aspired(name, {v: VersionSpec(name, v, f"/models/{name}/{v}", "tensorflow") for v in versions})


def _states(manager: ModelManager, name: str) -> list[tuple[int, State]]:
    return [(s.version, s.state) for s in manager.status(name)]


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_new_version_replaces_the_old_one_once_available():
    loads = _Loads()
    manager = _manager(loads)
    _aspire(manager, "m", 1)
    assert manager.wait_settled(["m"]) == []
    lease = manager.lease("m")
    assert (lease.version, lease.servable) == (1, loads.servables[1])
    _aspire(manager, "m", 2)
    _wait(lambda: _states(manager, "m") == [(2, State.AVAILABLE), (1, State.UNLOADING)])
    assert not loads.servables[1].closed  # a request still holds version 1
    lease.release()
    _wait(lambda: _states(manager, "m") == [(2, State.AVAILABLE), (1, State.END)])
    assert loads.servables[1].closed
    assert manager.lease("m").version == 2
    manager.unload_all()


def test_a_failed_version_never_takes_the_serving_one_down():
    loads = _Loads(failing={2})
    manager = _manager(loads, retries=2)
    _aspire(manager, "m", 1)
    manager.wait_settled(["m"])
    _aspire(manager, "m", 2)
    failures = manager.wait_settled(["m"])
    assert [(name, status.version, status.error.message) for name, status in failures] == [
        ("m", 2, "no model at /models/m/2")
    ]
    assert loads.attempts[2] == 3  # one attempt and two retries
    assert _states(manager, "m") == [(2, State.END), (1, State.AVAILABLE)]
    assert manager.lease("m").version == 1
    manager.unload_all()


def test_lookup_errors_are_tf_servings():
    manager = _manager(_Loads())
    _aspire(manager, "m", 1)
    manager.wait_settled(["m"])
    cases = [
        (dict(name=""), Code.INVALID_ARGUMENT, "ModelSpec has no name specified."),
        (dict(name="m", version=2), Code.NOT_FOUND, "Servable not found for request: Specific(m, 2)"),
        (dict(name="x"), Code.NOT_FOUND, "Servable not found for request: Latest(x)"),
        (dict(name="m", label="stable"), Code.INVALID_ARGUMENT, "Unrecognized servable version label: stable"),
    ]
    for kwargs, code, message in cases:
        with pytest.raises(ServingError) as info:
            manager.lease(**kwargs)
        assert (info.value.code, info.value.message) == (code, message)
    with pytest.raises(ServingError) as info:
        manager.status("x")
    assert info.value.message == "Could not find any versions of model x"
    manager.unload_all()


def test_labels_may_point_only_at_available_versions_unless_allowed():
    manager = _manager(_Loads())
    _aspire(manager, "m", 1, 2)
    manager.wait_settled(["m"])
    manager.set_labels({"m": {"stable": 1, "canary": 2}}, allow_unavailable=False)
    assert manager.lease("m", label="canary").version == 2
    with pytest.raises(ServingError) as info:
        manager.set_labels({"m": {"stable": 3}}, allow_unavailable=False)
    assert info.value.message == (
        "Request to assign label to version 3 of model m, which is not currently available for inference"
    )
    assert manager.lease("m", label="stable").version == 1  # all or nothing: the old labels stay
    manager.set_labels({"m": {"next": 3}}, allow_unavailable=True)  # a new label may wait for its version
    manager.set_labels({"m": {"stable": 1}}, allow_unavailable=False)
    with pytest.raises(ServingError):  # but a label in use may not move to a version that cannot serve
        manager.set_labels({"m": {"stable": 3}}, allow_unavailable=True)
    assert manager.lease("m", label="stable").version == 1
    manager.unload_all()


def test_the_source_feeds_the_manager_from_folders(tmp_path):
    (tmp_path / "1").mkdir()
    loads = _Loads()
    manager = _manager(loads)
    source = FileSystemSource(manager, poll_wait_s=0)
    config = ModelConfig("m", str(tmp_path), VersionPolicy("all"), platform="tensorflow")
    source.set_models([config])
    source.wait_for_versions(config)
    manager.wait_settled(["m"])
    assert _states(manager, "m") == [(1, State.AVAILABLE)]
    (tmp_path / "2").mkdir()
    source.set_models([ModelConfig("m", str(tmp_path), VersionPolicy("latest"), platform="tensorflow")])
    _wait(lambda: _states(manager, "m") == [(2, State.AVAILABLE), (1, State.END)])
    source.set_models([])  # the model is no longer configured: everything unloads
    _wait(lambda: _states(manager, "m") == [(2, State.END), (1, State.END)])
    manager.unload_all()


def test_unload_waits_for_the_last_lease():
    manager = _manager(_Loads())
    _aspire(manager, "m", 1)
    manager.wait_settled(["m"])
    lease = manager.lease("m")
    _aspire(manager, "m")
    released = threading.Timer(0.3, lease.release)
    released.start()
    _wait(lambda: _states(manager, "m") == [(1, State.END)])
    assert not released.is_alive()  # END came only after the release
    manager.unload_all()


# -- the model config file, polled ----------------------------------------------------------------------


def _config_file(path, **models: str) -> str:
    entries = "".join(
        f'config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }} '
        for name, base in models.items()
    )
    path.write_text(f"model_config_list {{ {entries}}}")
    return str(path)


def _core(config_file: str, poll_s: int = 0, core_class: type[ServerCore] = ServerCore) -> ServerCore:
    options = flags.Options()
    options.model_config_file = config_file
    options.model_config_file_poll_wait_seconds = poll_s
    options.file_system_poll_wait_seconds = 1
    options.max_num_load_retries = 0
    core = core_class(options, lambda spec: DoublingServable())
    core.start(core.initial_configs())
    return core


def test_config_file_is_parsed_again_only_when_its_bytes_change(tmp_path):
    path = tmp_path / "models.config"
    _config_file(path, a="/models/a")
    config_file = ConfigFile(str(path))
    assert [c.name for c in model_config.from_proto(config_file.read())] == ["a"]
    assert (config_file.parses, config_file.read_if_changed(), config_file.read_if_changed()) == (1, None, None)
    os.utime(path, ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))  # touched: new mtime, same bytes
    assert (config_file.read_if_changed(), config_file.parses) == (None, 1)
    _config_file(path, a="/models/a", b="/models/b")
    changed = config_file.read_if_changed()
    assert changed is not None and [c.name for c in model_config.from_proto(changed)] == ["a", "b"]
    assert (config_file.parses, config_file.read_if_changed()) == (2, None)
    path.write_text("not a config")
    with pytest.raises(ServingError) as info:
        config_file.read_if_changed()
    assert info.value.message == f"Invalid protobuf file: '{path}'"
    assert (config_file.read_if_changed(), config_file.parses) == (None, 3)  # a bad file is not parsed again either
    path.unlink()
    with pytest.raises(ServingError) as info:
        config_file.read_if_changed()
    assert (info.value.code, info.value.message) == (Code.NOT_FOUND, f"{path}; No such file or directory")
    path.write_text("not a config")  # back after it was gone: parsed, even with the bytes parsed last
    with pytest.raises(ServingError):
        config_file.read_if_changed()
    assert config_file.parses == 4


def test_a_polled_config_file_is_applied_when_it_changes(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "1").mkdir(parents=True)
    path = tmp_path / "models.config"
    core = _core(_config_file(path, a=tmp_path / "a"))
    assert core.config_file is not None and core.config_file.parses == 1
    core.poll_config_file()
    core.poll_config_file()
    assert core.config_file.parses == 1
    _config_file(path, a=tmp_path / "a", b=tmp_path / "b")
    core.poll_config_file()
    assert core.config_file.parses == 2
    assert core.readiness() == (True, {"a": "AVAILABLE", "b": "AVAILABLE"})
    core.poll_config_file()
    assert core.config_file.parses == 2
    core.stop()


def test_a_nul_byte_in_a_polled_base_path_keeps_the_old_config(tmp_path, caplog):
    for name in ("a", "b"):
        (tmp_path / name / "1").mkdir(parents=True)
    path = tmp_path / "models.config"
    core = _core(_config_file(path, a=tmp_path / "a"))
    path.write_text(
        f'model_config_list {{ config {{ name: "b" base_path: "{tmp_path}/b\\000x" model_platform: "tensorflow" }} }}'
    )
    core.poll_config_file()
    core.poll_config_file()  # unchanged: not parsed, not logged again
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "PollFilesystemAndReloadConfig failed to ReloadConfig: INVALID_ARGUMENT: Expected model b to have a "
        f"base_path without NUL bytes; got base_path()={tmp_path}/b\\000x"
    ]
    assert core.readiness() == (True, {"a": "AVAILABLE"})
    _config_file(path, b=tmp_path / "b")  # a good config later is applied
    core.poll_config_file()
    assert core.readiness() == (True, {"b": "AVAILABLE"})
    core.stop()


def test_on_change_is_called_for_state_changes_only_not_for_every_poll():
    loads = _Loads()
    manager = _manager(loads)
    changes: list[list[tuple[int, State]]] = []
    manager.on_change = lambda: changes.append(  # called with the manager's lock held
        [(v, r.status.state) for v, r in manager._models["m"].versions.items()]
    )
    _aspire(manager, "m", 1)
    assert manager.wait_settled(["m"]) == []
    seen = len(changes)
    assert changes[-1] == [(1, State.AVAILABLE)]
    for _ in range(5):  # what each poll of an unchanged folder does
        _aspire(manager, "m", 1)
    assert len(changes) == seen
    _aspire(manager, "m", 2)
    _wait(lambda: _states(manager, "m") == [(2, State.AVAILABLE), (1, State.END)])
    assert [(1, State.UNLOADING), (2, State.AVAILABLE)] in changes[seen:]  # the swap itself is announced
    assert changes[-1] == [(1, State.END), (2, State.AVAILABLE)]
    manager.unload_all()

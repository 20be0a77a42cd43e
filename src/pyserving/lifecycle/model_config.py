"""Which models to serve: `--model_config_file` (text-format ModelServerConfig) or the single-model flags.

The file is parsed with the official `ModelServerConfig` proto and validated the
way TF Serving's ServerCore does; the result is a list of `ModelConfig`, the only
form the rest of the server sees.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

from tensorflow_serving.config import file_system_storage_path_source_pb2, model_server_config_pb2

from pyserving import config_protos
from pyserving.errors import Code, ServingError, invalid_argument
from pyserving.runtimes import registry

__all__ = ["ConfigFile", "ModelConfig", "VersionPolicy", "from_proto", "single_model"]

log = logging.getLogger("pyserving")


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ServableVersionPolicy: latest N (default 1), all, or specific versions."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """One model to serve: where its versions are, which to load, their labels and their runtime."""

    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = field(default_factory=dict)
    platform: str = registry.TENSORFLOW_PLATFORM


def single_model(name: str, base_path: str, platform: str) -> list[ModelConfig]:
    """`--model_name` / `--model_base_path` / `--model_platform` (a relative path is taken from the working
    directory; the caller detects an empty `--model_platform`, see `sources.detect_platform`)."""
    if platform not in registry.platforms():
        raise invalid_argument(f"Model {name} requests unsupported platform {platform}")
    if platform == registry.TENSORFLOW_PLATFORM:
        log.info("Building single TensorFlow model file config:  model_name: %s model_base_path: %s", name, base_path)
    else:
        log.info("Building single %s model file config: model_name: %s model_base_path: %s", platform, name, base_path)
    if "://" not in base_path:  # an object-store URL (s3://, gs://, az://) stays as given
        base_path = os.path.abspath(base_path)
    return [ModelConfig(name, base_path, platform=platform)]


class ConfigFile:
    """`--model_config_file`, parsed again only when its bytes changed.

    A big config (millions of label entries) takes the text-format parser close to a minute, so a
    poll first compares the file's identity (device, inode, size, mtime, ctime) with the last read,
    and then the content's digest; either unchanged means no parse. A file modified within the
    last seconds is digested again at the next poll (its mtime could still change without
    showing), so no edit is missed. Not thread-safe: one poller.
    """

    _RECENT_NS = 2_000_000_000

    def __init__(self, path: str) -> None:
        self.path = path
        self.parses = 0  # how many times the file was parsed (tests and logs)
        self._identity: tuple[int, ...] | None = None
        self._digest: bytes | None = None

    def read(self) -> model_server_config_pb2.ModelServerConfig:
        """Parse the file now; `ServingError` if unreadable or unparsable."""
        config = self._read(force=True)
        assert config is not None  # forced
        return config

    def read_if_changed(self) -> model_server_config_pb2.ModelServerConfig | None:
        """The file's config if its bytes changed since the last read, else None (nothing parsed)."""
        return self._read(force=False)

    def _read(self, force: bool) -> model_server_config_pb2.ModelServerConfig | None:
        try:
            stat = os.stat(self.path)
            identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            if not force and identity == self._identity:
                return None
            data = config_protos.read_bytes(self.path)
        except (OSError, ServingError) as exc:  # gone or unreadable: whatever comes back is parsed
            self._identity = self._digest = None
            if isinstance(exc, ServingError):
                raise
            raise ServingError(Code.NOT_FOUND, f"{self.path}; {exc.strerror or exc}") from None
        recent = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < self._RECENT_NS
        self._identity = None if recent else identity
        digest = hashlib.sha256(data).digest()  # releases the GIL on big files
        if not force and digest == self._digest:
            return None
        self._digest = digest  # a file that does not parse is not parsed again until it changes
        self.parses += 1
        log.debug("Parsing %s (%d bytes)", self.path, len(data))
        return config_protos.parse_bytes(data, self.path, model_server_config_pb2.ModelServerConfig)


def from_proto(config: model_server_config_pb2.ModelServerConfig) -> list[ModelConfig]:
    """Validate a ModelServerConfig and convert it, in file order (an empty config serves nothing)."""
    kind = config.WhichOneof("config")
    if kind == "custom_model_config":
        raise ServingError(Code.UNIMPLEMENTED, "ModelServer does not yet support custom model config.")
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for proto in config.model_config_list.config:
        if proto.name in seen:
            raise invalid_argument(f"Illegal to list model {proto.name} multiple times in config list")
        seen.add(proto.name)
        if "\0" in proto.base_path:  # no file system takes one (TF Serving's C strings would end there)
            shown = proto.base_path.replace("\0", "\\000")
            raise invalid_argument(
                f"Expected model {proto.name} to have a base_path without NUL bytes; got base_path()={shown}"
            )
        if not os.path.isabs(proto.base_path) and "://" not in proto.base_path:
            raise invalid_argument(
                f"Expected model {proto.name} to have an absolute path or URI; got base_path()={proto.base_path}"
            )
        platform = _platform(proto)
        if proto.HasField("logging_config"):
            raise invalid_argument("No request-logger-creator provided.")
        models.append(
            ModelConfig(
                proto.name, proto.base_path, _policy(proto.model_version_policy), dict(proto.version_labels), platform
            )
        )
    return models


def _platform(proto: model_server_config_pb2.ModelConfig) -> str:
    """The runtime a model config asks for, checked as TF Serving checks it."""
    if proto.model_type and proto.model_platform:
        raise invalid_argument(
            "Illegal setting both ModelServerConfig::model_type (deprecated) and ModelServerConfig::model_platform."
        )
    if proto.model_type:
        log.warning("Deprecated ModelServerConfig::model_type field used. Prefer ModelServerConfig::model_platform.")
        if proto.model_type != model_server_config_pb2.TENSORFLOW:
            raise invalid_argument(f"ModelServerConfig::model_type choice {proto.model_type} not supported.")
        return registry.TENSORFLOW_PLATFORM
    if not proto.model_platform:
        raise invalid_argument(
            "Illegal setting neither ModelServerConfig::model_type (deprecated) nor ModelServerConfig::model_platform."
        )
    if proto.model_platform not in registry.platforms():
        raise invalid_argument(f"Model {proto.name} requests unsupported platform {proto.model_platform}")
    return proto.model_platform


def _policy(
    proto: file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy,
) -> VersionPolicy:
    kind = proto.WhichOneof("policy_choice")
    if kind == "all":
        return VersionPolicy("all")
    if kind == "specific":
        return VersionPolicy("specific", versions=tuple(proto.specific.versions))
    return VersionPolicy("latest", num_versions=max(proto.latest.num_versions, 1))

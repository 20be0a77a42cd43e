"""Model base paths on object stores (`s3://`, `gs://`, `az://`/`abfs://`): listing, completeness, a local cache.

The manager only loads local folders, so a remote version is copied whole into `--model_cache_dir` first
and aspired with that folder's path. `RemoteStore` does the remote part for `sources.FileSystemSource`, on
its polling thread:

- one recursive listing of the base path per poll gives every version folder's objects (names, sizes);
- a version is *complete* when its folder holds a model marker file (`saved_model.pb`, `saved_model.pbtxt`,
  `model.tflite`, `model.onnx`, `processing.py`) at its top level and its listing (names and sizes) is the
  same as at the previous poll. A version still being uploaded is therefore never loaded half-written,
  provided its uploader does not pause for a whole poll interval with the marker already up (upload the
  marker last, as for local folders); it is looked at again at the next poll;
- a complete version is downloaded into a temporary folder inside the cache, its files' sizes checked
  against the listing, then renamed into place: the cache never holds half a version. A cache folder that
  already matches the listing (a restart) is reused. Versions are immutable once complete (a changed
  object in a cached version is not downloaded again while it stays cached);
- the source removes a version's cache folder once the version is no longer aspired and the manager has
  unloaded it.

File systems come from fsspec (`pyserving[s3]`, `[gcs]`, `[azure]`) with options from the standard
places: for S3 the AWS variables, profiles and `AWS_ENDPOINT_URL` (botocore reads them), plus TF's own
`S3_ENDPOINT`, `S3_USE_HTTPS`, `S3_VERIFY_SSL` and `AWS_REGION`; for GCS `GOOGLE_APPLICATION_CREDENTIALS`
and `STORAGE_EMULATOR_HOST`; for Azure `AZURE_STORAGE_CONNECTION_STRING` or `AZURE_STORAGE_ACCOUNT_NAME`
with `AZURE_STORAGE_KEY` / `AZURE_STORAGE_SAS_TOKEN`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pyserving.runtimes import registry

__all__ = [
    "RemoteStore",
    "StorageError",
    "default_cache_dir",
    "detect_platform",
    "is_remote",
]

log = logging.getLogger("pyserving")

# URL scheme -> (fsspec protocol, the pyserving extra that installs it).
_SCHEMES = {
    "s3": ("s3", "s3"),
    "gs": ("gcs", "gcs"),
    "gcs": ("gcs", "gcs"),
    "az": ("az", "azure"),
    "abfs": ("az", "azure"),
}

# Timeouts of one request to a store, and the attempts per request: a poll that meets a dead endpoint fails
# in seconds, not minutes (the stores' clients default to retrying for minutes, holding the polling thread).
_CONNECT_TIMEOUT_S = 5
_READ_TIMEOUT_S = 30
_ATTEMPTS = 2
# A listing that takes longer than this is abandoned (cancelled) and counted as failed: a backstop for a
# store that accepts connections but answers too slowly, whatever its client's retries.
_LIST_DEADLINE_S = 60
# A temporary copy folder older than this was left by a server that died while copying.
_STALE_PARTIAL_S = 3600


class StorageError(Exception):
    """A base path that could not be listed or a version that could not be copied (logged; retried next poll)."""


def scheme(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_remote(path: str) -> bool:
    """Whether `path` is an object-store URL pyserving copies from (`s3://`, `gs://`, `az://`, `abfs://`)."""
    return scheme(path) in _SCHEMES


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "pyserving-model-cache")


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _s3_options() -> dict[str, Any]:
    """s3fs options from TF's S3 variables; credentials and the rest botocore finds by itself."""
    client: dict[str, Any] = {}
    endpoint = os.environ.get("S3_ENDPOINT", "")
    if endpoint:
        if "://" not in endpoint:  # TF's form: host[:port], the scheme from S3_USE_HTTPS (default https)
            endpoint = ("https://" if _env_flag("S3_USE_HTTPS", True) else "http://") + endpoint
        client["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if not _env_flag("S3_VERIFY_SSL", True):
        client["verify"] = False
    config = {
        "connect_timeout": _CONNECT_TIMEOUT_S,
        "read_timeout": _READ_TIMEOUT_S,
        "retries": {"max_attempts": _ATTEMPTS},
    }
    return {"client_kwargs": client, "config_kwargs": config, "use_listings_cache": False}


def _gcs_options() -> dict[str, Any]:
    import aiohttp

    # gcsfs hands `requests_timeout` to aiohttp per request: a ClientTimeout bounds the connection and each
    # read, not the whole request (a plain number would be a total, cutting off a large download).
    timeout = aiohttp.ClientTimeout(total=None, connect=_CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S)
    options: dict[str, Any] = {"use_listings_cache": False, "requests_timeout": timeout}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator:
        if "://" not in emulator:
            emulator = "http://" + emulator
        options.update(endpoint_url=emulator, token="anon")
    elif os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        options["token"] = os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
    return options


def _azure_options() -> dict[str, Any]:
    options: dict[str, Any] = {"connection_timeout": _CONNECT_TIMEOUT_S, "read_timeout": _READ_TIMEOUT_S}
    connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    if connection:
        options["connection_string"] = connection
    else:
        for option, variable in (
            ("account_name", "AZURE_STORAGE_ACCOUNT_NAME"),
            ("account_key", "AZURE_STORAGE_KEY"),
            ("sas_token", "AZURE_STORAGE_SAS_TOKEN"),
        ):
            if os.environ.get(variable):
                options[option] = os.environ[variable]
    return options


_OPTIONS = {"s3": _s3_options, "gcs": _gcs_options, "az": _azure_options}


def filesystem(url: str) -> Any:
    """A new fsspec file system for `url`'s scheme, configured from the environment; StorageError if the
    scheme's package is not installed."""
    protocol, extra = _SCHEMES[scheme(url)]
    try:
        import fsspec

        options = _OPTIONS[protocol]()
        _quiet_client_logs()
        if protocol == "gcs":
            return _gcs_class()(skip_instance_cache=True, **options)
        if protocol == "az":
            return _azure_class()(skip_instance_cache=True, **options)
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except ImportError as exc:
        raise StorageError(f"{scheme(url)}:// base paths need pyserving[{extra}] ({exc})") from None


def _quiet_client_logs() -> None:
    """azure-core logs every request and response at INFO, gcsfs each request out of retries with its
    traceback: a store that is down would fill the log at every poll, while pyserving logs each failed
    listing or copy in one line itself. Their loggers are raised to WARNING and CRITICAL unless a level was
    set for them already."""
    for name, level in (("azure", logging.WARNING), ("gcsfs", logging.CRITICAL)):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def _gcs_class() -> type:
    """gcsfs's file system with `_ATTEMPTS` attempts per request instead of its 6 (about 36 s of back-off
    against a dead endpoint). Its attempts are fixed when its class is defined (`retries`, read by a
    decorator of `_request`): this subclass decorates the undecorated method again with gcsfs's own
    `retry_request`; should a gcsfs release change that shape, its default retries stay (the listing
    deadline still bounds a poll).

    With `STORAGE_EMULATOR_HOST` set, the plain JSON-API class: gcsfs's default one first asks GCS's gRPC
    control plane for the bucket's layout, which an emulator does not serve (a minute's timeout per bucket)."""
    import fsspec

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from gcsfs.core import GCSFileSystem

        base: Any = GCSFileSystem
    else:
        base = fsspec.get_filesystem_class("gcs")
    from gcsfs.retry import retry_request

    undecorated = getattr(base._request, "__wrapped__", None)
    if undecorated is None:
        return base
    return type("BoundedGCSFileSystem", (base,), {"_request": retry_request(retries=_ATTEMPTS)(undecorated)})


def _azure_class() -> type:
    """adlfs's file system whose BlobServiceClient retries a request once, after about a second, with
    bounded connection and read timeouts (azure-storage-blob's defaults: up to 10 retries with back-offs
    from 15 s, minutes against a dead endpoint). adlfs passes no client options through, so this subclass
    builds the client in `do_connect` itself, for the settings `_azure_options` gives: a connection
    string, or an account name with a key, a SAS token or nothing (anonymous)."""
    from adlfs import AzureBlobFileSystem
    from azure.storage.blob.aio import BlobServiceClient

    client_options: dict[str, Any] = {
        "retry_total": _ATTEMPTS - 1,
        "retry_connect": _ATTEMPTS - 1,
        "retry_read": _ATTEMPTS - 1,
        "retry_status": _ATTEMPTS - 1,
        "initial_backoff": 1,
        "increment_base": 2,
        "connection_timeout": _CONNECT_TIMEOUT_S,
        "read_timeout": _READ_TIMEOUT_S,
    }

    class BoundedAzureBlobFileSystem(AzureBlobFileSystem):
        def do_connect(self) -> None:
            if self.connection_string:
                self.service_client = BlobServiceClient.from_connection_string(self.connection_string, **client_options)
                return
            if self.account_name and self.credential is None and not hasattr(self, "account_host"):
                url = f"https://{self.account_name}.blob.core.windows.net"
                if self.account_key:
                    self.service_client = BlobServiceClient(url, credential=self.account_key, **client_options)
                    return
                sas = self.sas_token or ""
                if sas and not sas.startswith("?"):
                    sas = "?" + sas
                self.service_client = BlobServiceClient(url + sas, **client_options)
                return
            super().do_connect()  # a configuration pyserving does not give: adlfs's own client

    return BoundedAzureBlobFileSystem


def _markers() -> frozenset[str]:
    return frozenset(name for names in registry.markers().values() for name in names)


# A version folder's objects: path relative to the version folder -> size in bytes.
Listing = dict[str, int]


def list_base_path(fs: Any, url: str) -> dict[str, Listing]:
    """Every object under `url`, grouped by its first path component (the candidate version folders).

    StorageError for a failed listing or a base path with no object at all (an object store has no empty
    folders: TF Serving's "Could not find base path")."""
    from fsspec.exceptions import FSTimeoutError

    root = fs._strip_protocol(url).rstrip("/")
    try:
        fs.invalidate_cache()
        # fsspec's `timeout` on an async file system's call cancels the call once it has run that long.
        entries = fs.find(root, detail=True, timeout=_LIST_DEADLINE_S)
    except FSTimeoutError:
        raise StorageError(f"the listing took more than {_LIST_DEADLINE_S} s (abandoned)") from None
    except Exception as exc:  # credentials, bucket, network: whatever the store's client raises
        raise StorageError(_describe(exc)) from exc
    folders: dict[str, Listing] = {}
    for name, info in entries.items():
        if not name.startswith(root + "/") or name.endswith("/") or info.get("type") == "directory":
            continue
        folder, _, rest = name[len(root) + 1 :].partition("/")
        if rest:
            folders.setdefault(folder, {})[rest] = int(info.get("size") or 0)
    if not entries:
        raise StorageError("no object under the base path")
    return folders


def detect_platform(url: str) -> str:
    """A remote single model's platform: the newest version folder whose listing names a runtime's marker
    (tensorflow if none, or if the store cannot be listed yet)."""
    from pyserving.lifecycle.sources import parse_version

    try:
        folders = list_base_path(filesystem(url), url)
    except StorageError:
        return registry.TENSORFLOW_PLATFORM
    versions = sorted(((v, f) for f in folders if (v := parse_version(f)) is not None), reverse=True)
    for _, folder in versions:
        platform = registry.platform_of(name for name in folders[folder] if "/" not in name)
        if platform is not None:
            return platform
    return registry.TENSORFLOW_PLATFORM


@dataclass
class _Base:
    """What the store knows of one base path between polls."""

    previous: dict[int, Listing] = field(default_factory=dict)  # the last poll's version listings
    cached: dict[int, str] = field(default_factory=dict)  # version -> its complete cache folder
    names: dict[int, str] = field(default_factory=dict)  # version -> its remote folder's name (`00002`)


class RemoteStore:
    """The remote base paths of a source: listings, completeness, the cache. Called with the source's lock."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self._filesystems: dict[str, Any] = {}
        self._bases: dict[tuple[str, str], _Base] = {}
        self._lock = threading.Lock()

    def _fs(self, url: str) -> Any:
        protocol = _SCHEMES[scheme(url)][0]
        with self._lock:
            if protocol not in self._filesystems:
                self._filesystems[protocol] = filesystem(url)
            return self._filesystems[protocol]

    def complete_versions(self, name: str, url: str) -> dict[int, Listing]:
        """The versions under `url` that are complete now (see the module's rule); StorageError if the
        listing failed."""
        from pyserving.lifecycle.sources import parse_version

        folders = list_base_path(self._fs(url), url)
        base = self._bases.setdefault((name, url), _Base())
        listings: dict[int, Listing] = {}
        base.names = {}
        for folder in sorted(folders):
            version = parse_version(folder)
            if version is not None and version not in listings:
                listings[version] = folders[folder]
                base.names[version] = folder
        previous, base.previous = base.previous, listings
        markers = _markers()
        complete: dict[int, Listing] = {}
        for version, listing in listings.items():
            if not markers.intersection(listing):
                log.debug("Version %d under %s has no model file yet", version, url)
            elif version in base.cached or previous.get(version) == listing:
                complete[version] = listing
            else:
                log.info("Version %d under %s is new or still changing; looked at again at the next poll", version, url)
        return complete

    def cache_folder(self, name: str, url: str, version: int) -> str:
        digest = hashlib.sha256(f"{name}\n{url.rstrip('/')}".encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, digest, str(version))

    def ensure_cached(self, name: str, url: str, version: int, listing: Listing) -> str:
        """The local folder holding `version` of `url`, downloaded whole first if needed; StorageError."""
        base = self._bases.setdefault((name, url), _Base())
        if version in base.cached:
            return base.cached[version]
        target = self.cache_folder(name, url, version)
        if os.path.isdir(target) and _matches(target, listing):
            log.info("Using the cached copy of version %d of %s in %s", version, url, target)
            base.cached[version] = target
            return target
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        for name in os.listdir(parent):  # left by a killed server (another may be copying: only old ones)
            stale = os.path.join(parent, name)
            if name.startswith(f".{version}.") and name.endswith(".partial") and _age_s(stale) > _STALE_PARTIAL_S:
                shutil.rmtree(stale, ignore_errors=True)
        staging = os.path.join(parent, f".{version}.{uuid.uuid4().hex}.partial")
        fs = self._fs(url)
        remote_folder = f"{fs._strip_protocol(url).rstrip('/')}/{base.names.get(version, str(version))}"
        try:
            remote = [f"{remote_folder}/{name}" for name in sorted(listing)]
            local = [os.path.join(staging, *name.split("/")) for name in sorted(listing)]
            for path in local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            log.info(
                "Copying version %d of %s (%d files, %d bytes) to %s",
                version,
                url,
                len(listing),
                sum(listing.values()),
                target,
            )
            try:
                fs.get(remote, local)
            except Exception as exc:
                raise StorageError(f"copying version {version} failed: {_describe(exc)}") from exc
            if not _matches(staging, listing):
                raise StorageError(f"version {version} changed while it was copied")
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        base.cached[version] = target
        return target

    def cached_versions(self, name: str, url: str) -> dict[int, str]:
        base = self._bases.get((name, url))
        return dict(base.cached) if base else {}

    def evict(self, name: str, url: str, version: int) -> None:
        """Remove `version`'s cache folder (it is unloaded)."""
        base = self._bases.get((name, url))
        path = base.cached.pop(version, None) if base else None
        if path is not None:
            log.info("Removing the cached copy of version %d of %s (%s)", version, url, path)
            shutil.rmtree(path, ignore_errors=True)

    def forget(self, name: str, url: str) -> None:
        """`url` is not `name`'s base path any more: forget its listings (its cache goes with `evict`)."""
        base = self._bases.get((name, url))
        if base is not None:
            base.previous = {}


def _describe(exc: BaseException) -> str:
    """An exception in one line: its type and its message's first line (Azure's add request ids and XML)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def _matches(folder: str, listing: Listing) -> bool:
    """Whether `folder` holds exactly the listing's files with their sizes."""
    found: Listing = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return found == listing

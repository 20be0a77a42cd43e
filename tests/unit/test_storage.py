"""Object-store base paths: URL recognition, options from the environment, platform from file names."""

from __future__ import annotations

import pytest

from pyserving.lifecycle import model_config, storage
from pyserving.runtimes import registry


@pytest.mark.parametrize(
    ("path", "remote"),
    [
        ("s3://bucket/models/m", True),
        ("S3://bucket/m", True),
        ("gs://bucket/m", True),
        ("az://container/m", True),
        ("abfs://container/m", True),
        ("/models/m", False),
        ("models/s3://x", False),
        ("http://host/m", False),
    ],
)
def test_remote_urls(path, remote):
    assert storage.is_remote(path) is remote


def test_s3_options_from_tf_variables(monkeypatch):
    for variable in ("S3_ENDPOINT", "S3_USE_HTTPS", "S3_VERIFY_SSL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(variable, raising=False)
    assert storage._s3_options()["client_kwargs"] == {}
    monkeypatch.setenv("S3_ENDPOINT", "minio:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage._s3_options()["client_kwargs"] == {"endpoint_url": "https://minio:9000", "region_name": "eu-west-3"}
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    monkeypatch.setenv("S3_VERIFY_SSL", "0")
    assert storage._s3_options()["client_kwargs"] == {
        "endpoint_url": "http://minio:9000",
        "region_name": "eu-west-3",
        "verify": False,
    }
    monkeypatch.setenv("S3_ENDPOINT", "https://s3.example.com")
    assert storage._s3_options()["client_kwargs"]["endpoint_url"] == "https://s3.example.com"
    options = storage._s3_options()
    assert (options["use_listings_cache"], options["config_kwargs"]["connect_timeout"]) == (False, 5)


def test_platform_from_file_names():
    assert registry.platform_of(["variables", "saved_model.pb", "processing.py"]) == "tensorflow"
    assert registry.platform_of(["model.onnx", "processing.py"]) == "onnx"
    assert registry.platform_of(["processing.py"]) == "python"
    assert registry.platform_of(["model.tflite"]) == "tensorflow"
    assert registry.platform_of(["variables/variables.index"]) is None


def test_single_model_keeps_a_url():
    (config,) = model_config.single_model("m", "s3://bucket/m", "tensorflow")
    assert config.base_path == "s3://bucket/m"


def test_default_cache_dir_is_under_the_temp_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert storage.default_cache_dir() == str(tmp_path / "pyserving-model-cache")


def test_a_source_error_shows_in_the_status_only_while_the_model_has_no_version():
    from helpers import DoublingServable

    from pyserving.errors import ServingError
    from pyserving.lifecycle.manager import ModelManager, RetryPolicy, State, VersionSpec

    manager = ModelManager(lambda spec: DoublingServable(), RetryPolicy(0, 0.01), load_threads=1, unload_threads=1)
    try:
        manager.set_source_error("m", "Could not list base path s3://b/m: PermissionError: denied")
        with pytest.raises(ServingError) as error:
            manager.status("m")
        assert (error.value.code.name, error.value.message) == (
            "NOT_FOUND",
            "Could not find any versions of model m: Could not list base path s3://b/m: PermissionError: denied",
        )
        assert not manager.knows("m")  # the error does not make a model of it
        manager.set_aspired("m", {1: VersionSpec("m", 1, "/nowhere", "tensorflow")})
        manager.wait_settled(["m"])
        assert [(s.version, s.state) for s in manager.status("m")] == [(1, State.AVAILABLE)]
        manager.set_source_error("other", None)
        manager.set_source_error("m", None)
        manager.set_aspired("m", {})
    finally:
        manager.unload_all()
    assert [(s.version, s.state) for s in manager.status("m")] == [(1, State.END)]


def test_gcs_requests_are_bounded(monkeypatch):
    """2 attempts per request (gcsfs's own are 6, about 36 s of back-off against a dead endpoint), and
    timeouts on the connection and each read, none on the whole request (a large download may take long)."""
    pytest.importorskip("gcsfs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    fs = storage.filesystem("gs://bucket/model")
    assert type(fs).__name__ == "BoundedGCSFileSystem"
    timeout = fs.requests_timeout
    assert (timeout.total, timeout.connect, timeout.sock_read) == (None, 5, 30)
    assert fs._endpoint == "http://127.0.0.1:9"


def test_azure_client_retries_once_with_timeouts(monkeypatch):
    pytest.importorskip("adlfs")
    key = "QUJD"  # base64 of "ABC": never sent anywhere
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", f"AccountName=acct;AccountKey={key};BlobEndpoint=http://127.0.0.1:9/acct;"
    )
    fs = storage.filesystem("az://container/model")
    assert type(fs).__name__ == "BoundedAzureBlobFileSystem"
    client = fs.service_client
    assert client.url == "http://127.0.0.1:9/acct/"
    retry = client._config.retry_policy
    assert (retry.total_retries, retry.connect_retries, retry.read_retries) == (1, 1, 1)
    assert (retry.initial_backoff, retry.increment_base) == (1, 2)
    transport = client._config.transport
    assert (transport.connection_config.timeout, transport.connection_config.read_timeout) == (5, 30)

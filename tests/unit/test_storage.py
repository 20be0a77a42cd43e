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
